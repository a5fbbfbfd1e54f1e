"""IAS-ViT against transformers' unmodified InternVL vision tower and torch's MultiheadAttention."""
from __future__ import annotations

import pytest
import torch
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig
from transformers.models.internvl.modeling_internvl import InternVLVisionLayer, InternVLVisionModel

from stages.families.fusion import PRIOR_FLOOR, cross_attention_parameters, saliency_prior
from stages.families.internvl.configs import TINY_CONFIGS
from stages.families.internvl.ias_vit import IASVisionLayer, IASVisionModel, SaliencyCrossAttention

# InternViT-300M (InternVL2/2.5/3 vision encoder): 24 layers x 1024, 16 heads, MLP 4096, qkv bias, 448 px, patch 14
REAL = InternVLVisionConfig(**TINY_CONFIGS["internvit300m-shape"][0])


def _small(layers: int = 2, image: int = 56, **kw) -> InternVLVisionConfig:
    return InternVLVisionConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=128,
                                image_size=image, patch_size=14, **kw)


def _pair(cfg: InternVLVisionConfig) -> tuple[InternVLVisionModel, IASVisionModel]:
    """The unmodified tower and an IAS tower holding the same pretrained weights."""
    torch.manual_seed(0)
    base = InternVLVisionModel(cfg).eval()
    ias = IASVisionModel(cfg).eval()
    result = ias.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) == {n for n, _ in cross_attention_parameters(ias)}
    return base, ias


def _inputs(cfg: InternVLVisionConfig, tiles: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    s = cfg.image_size[0]
    return torch.randn(tiles, 3, s, s), torch.rand(tiles, 1, s, s)


def test_real_internvit300m_layer_with_zero_gate_is_the_unmodified_layer() -> None:
    """Real per-layer shape (1024 wide, 16 heads, MLP 4096, qkv bias) on a real 448 px tile
    (1 + 32x32 tokens). Stacking layers composes exactly, so this holds for all 24."""
    torch.manual_seed(0)
    base = InternVLVisionLayer(REAL).eval()
    ias = IASVisionLayer(REAL).eval()
    ias.load_state_dict(base.state_dict(), strict=False)
    torch.nn.init.normal_(ias.lambda_1)  # non-trivial layer scales
    base.lambda_1.data.copy_(ias.lambda_1.data)
    assert ias.cross_attention.gate.abs().max() == 0  # zero-initialised
    n = (REAL.image_size[0] // REAL.patch_size[0]) ** 2 + 1
    h, s = torch.randn(1, n, REAL.hidden_size), torch.randn(1, n, REAL.hidden_size)
    with torch.no_grad():
        assert torch.equal(ias(h, s, saliency_prior(torch.rand(1, n))), base(h))


def test_full_depth_tower_with_zero_gates_equals_unmodified_tower() -> None:
    """Real depth (24 layers), real 448 px tiles and token count; width reduced to 64 for speed."""
    cfg = _small(layers=REAL.num_hidden_layers, image=448)
    base, ias = _pair(cfg)
    x, sal = _inputs(cfg, tiles=2)
    with torch.no_grad():
        ref = base(x, output_hidden_states=True)
        out = ias(x, sal, output_hidden_states=True)
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
    assert len(out.hidden_states) == len(ref.hidden_states) == 25
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, ref.hidden_states))


def _open_gates(model: IASVisionModel, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for layer in model.encoder.layer:
        layer.cross_attention.gate.data = torch.randn(layer.cross_attention.gate.shape, generator=g)


def test_open_gates_make_saliency_matter_and_gradients_reach_every_cross_attention_parameter() -> None:
    cfg = _small(layers=3)
    _, ias = _pair(cfg)
    _open_gates(ias)
    x, sal = _inputs(cfg)
    out = ias(x, sal).last_hidden_state
    other = ias(x, torch.rand_like(sal)).last_hidden_state
    assert not torch.allclose(out, other, atol=1e-4)
    out.square().mean().backward()
    params = cross_attention_parameters(ias)
    assert len(params) == 3 * 10  # gate, 2 norms x (w, b), q/k/v weights, o weight + bias
    for name, p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_zero_gates_still_pass_gradient_to_the_gates() -> None:
    """At initialisation the gates are the only cross-attention parameters that learn (Flamingo-style)."""
    cfg = _small()
    _, ias = _pair(cfg)
    x, sal = _inputs(cfg)
    ias(x, sal).last_hidden_state.square().mean().backward()
    for layer in ias.encoder.layer:
        assert layer.cross_attention.gate.grad.abs().sum() > 0
        assert layer.cross_attention.q_proj.weight.grad.abs().sum() == 0


def test_tiles_are_independent() -> None:
    cfg = _small()
    _, ias = _pair(cfg)
    _open_gates(ias)
    x, sal = _inputs(cfg, tiles=3)
    with torch.no_grad():
        together = ias(x, sal).last_hidden_state
        alone = ias(x[1:2], sal[1:2]).last_hidden_state
    torch.testing.assert_close(together[1:2], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("uniform", [False, True])
def test_cross_attention_matches_torch_multihead_attention(uniform: bool) -> None:
    """Queries from saliency tokens, keys/values from image tokens (after their LayerNorms), log(s + floor) of the
    keys' saliency added to the logits (torch's float attn_mask); a uniform map is plain attention."""
    cfg = _small()
    torch.manual_seed(0)
    xattn = SaliencyCrossAttention(cfg)
    for p in xattn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    mha = torch.nn.MultiheadAttention(d, heads, bias=True, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([xattn.q_proj.weight, xattn.k_proj.weight, xattn.v_proj.weight]))
        mha.in_proj_bias.zero_()  # attention_bias=False in this config
        mha.out_proj.weight.copy_(xattn.o_proj.weight)
        mha.out_proj.bias.copy_(xattn.o_proj.bias)
    image, saliency = torch.randn(2, 17, d), torch.randn(2, 17, d)
    key_saliency = torch.ones(2, 17) if uniform else torch.rand(2, 17)
    logits = torch.log(key_saliency + PRIOR_FLOOR)  # [B, N]
    mask = None if uniform else logits[:, None, :].expand(-1, 17, -1).repeat_interleave(heads, 0)  # [B*H, M, N]
    ref, _ = mha(xattn.norm_query(saliency), xattn.norm_context(image), xattn.norm_context(image), attn_mask=mask)
    torch.testing.assert_close(xattn(image, saliency, saliency_prior(key_saliency)), xattn.gate * ref,
                               rtol=1e-5, atol=1e-5)


def test_one_embedding_call_gives_the_image_tokens_and_the_weighted_tile_tokens() -> None:
    """Image tokens equal the unmodified tower's embedding exactly; saliency tokens equal patch conv + CLS +
    position embedding of tile x saliency tile, computed directly; the key prior is log(floor + each patch's
    mean saliency), the tile's mean for CLS, computed by a loop."""
    cfg = _small()
    base, ias = _pair(cfg)
    for model in (base, ias):
        torch.nn.init.normal_(model.embeddings.cls_token, generator=torch.Generator().manual_seed(1))
        torch.nn.init.normal_(model.embeddings.position_embeddings, generator=torch.Generator().manual_seed(2))
    x, sal = _inputs(cfg, tiles=3)
    calls = []
    ias.embeddings.patch_embeddings.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        image, tokens, prior = ias.embed(x, sal)
        assert torch.equal(image, base.embeddings(x))
    assert len(calls) == 1
    patches = torch.nn.functional.conv2d(x * sal, ias.embeddings.patch_embeddings.projection.weight,
                                         ias.embeddings.patch_embeddings.projection.bias, stride=14)
    expected = torch.cat([ias.embeddings.cls_token.expand(3, -1, -1), patches.flatten(2).transpose(1, 2)], 1)
    torch.testing.assert_close(tokens, expected + ias.embeddings.position_embeddings, rtol=1e-5, atol=1e-5)
    g = x.shape[-1] // 14
    means = [[sal[t, 0].mean().item()] + [sal[t, 0, 14 * r:14 * r + 14, 14 * c:14 * c + 14].mean().item()
                                          for r in range(g) for c in range(g)] for t in range(3)]
    torch.testing.assert_close(prior, torch.log(torch.tensor(means) + PRIOR_FLOOR), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant: bool) -> None:
    cfg = _small(layers=3)
    _, ias = _pair(cfg)
    _open_gates(ias)
    ias.train()
    x, sal = _inputs(cfg)

    calls = []
    ias.encoder.layer[0].cross_attention.register_forward_hook(lambda *_: calls.append(1))

    def grads() -> dict[str, torch.Tensor]:
        ias.zero_grad()
        calls.clear()
        ias(x, sal).last_hidden_state.square().mean().backward()
        return {n: p.grad.clone() for n, p in ias.named_parameters() if p.grad is not None}

    plain = grads()
    assert len(calls) == 1
    ias.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    checkpointed = grads()
    assert len(calls) == 2  # the layer was recomputed in backward
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(ias.parameters()))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fusion_none_is_the_plain_tower() -> None:
    cfg = _small()
    torch.manual_seed(0)
    base = InternVLVisionModel(cfg).eval()
    ablation = IASVisionModel(cfg, fusion="none").eval()
    ablation.load_state_dict(base.state_dict(), strict=True)  # exactly the same keys
    assert not cross_attention_parameters(ablation)
    x, sal = _inputs(cfg)
    with torch.no_grad():
        assert torch.equal(ablation(x, sal).last_hidden_state, base(x).last_hidden_state)


def test_cross_attention_without_saliency_is_an_error() -> None:
    cfg = _small()
    with pytest.raises(ValueError, match="saliency_values"):
        IASVisionModel(cfg)(torch.randn(1, 3, 56, 56))
    with pytest.raises(ValueError, match="fusion"):
        IASVisionModel(cfg, fusion="concat")
