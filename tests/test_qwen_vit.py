"""IAS on Qwen2.5-VL's vision tower against transformers' unmodified tower, the Qwen2.5-VL image processor's
patch order, and slow obviously-correct loops (per-pixel bilinear sampling, per-token segment attention)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLVisionBlock,
    Qwen2_5_VLVisionRotaryEmbedding,
    apply_rotary_pos_emb_vision,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from stages.families.fusion import PRIOR_FLOOR, cross_attention_parameters
from stages.families.qwen.configs import VISION_QWEN25VL
from stages.families.qwen.vit import (
    IASQwenVisionBlock,
    IASQwenVisionModel,
    QwenSaliencyCrossAttention,
    patch_saliency,
    vision_tower,
)

REAL = Qwen2_5_VLVisionConfig(**VISION_QWEN25VL, out_hidden_size=3584)  # the released tower: 32 x 1280, 16 heads
PATCH = 3 * 2 * 14 * 14  # one row of pixel_values: channels x temporal patch x 14 x 14
# odd image sizes (width, height) and what the processor makes of them at the tiny budget
SIZES = [(203, 131), (61, 97)]
BUDGET = dict(min_pixels=56 * 56, max_pixels=4 * 224 * 224)


def _small(depth: int = 4, window: int = 56, full: tuple[int, ...] = (1, 3)) -> Qwen2_5_VLVisionConfig:
    return Qwen2_5_VLVisionConfig(depth=depth, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=32,
                                  window_size=window, fullatt_block_indexes=list(full))


def _pair(cfg: Qwen2_5_VLVisionConfig) -> tuple[Qwen2_5_VisionTransformerPretrainedModel, IASQwenVisionModel]:
    """The unmodified tower and an IAS tower holding the same pretrained weights."""
    torch.manual_seed(0)
    base = Qwen2_5_VisionTransformerPretrainedModel(cfg).eval()
    ias = IASQwenVisionModel(cfg).eval()
    result = ias.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) == {n for n, _ in cross_attention_parameters(ias)}
    return base, ias


def _grid(sizes: list[tuple[int, int]], budget: dict[str, int] = BUDGET) -> torch.Tensor:
    """image_grid_thw [N, 3] as the processor computes it (smart resize to multiples of 28)."""
    rows = []
    for w, h in sizes:
        rh, rw = smart_resize(h, w, factor=28, **budget)
        rows.append([1, rh // 14, rw // 14])
    return torch.tensor(rows)


def _inputs(grid: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(int(grid.prod(-1).sum()), PATCH, generator=g), torch.rand(len(grid), 14, 14, generator=g) * 5


def _open_gates(model: torch.nn.Module, seed: int = 1) -> None:
    """Random gates and cross-attention weights large enough that saliency visibly moves the output."""
    g = torch.Generator().manual_seed(seed)
    for name, p in cross_attention_parameters(model):
        p.data = torch.randn(p.shape, generator=g) * (1.0 if name.endswith("gate") else 0.2)


# ---------------------------------------------------------------- zero gates = the unmodified tower


def test_real_qwen25vl_block_with_zero_gate_is_the_unmodified_block() -> None:
    """The released block shape (1280 wide, 16 heads, SwiGLU 3420, qkv bias) on a real image's patches
    (448 x 448 px: 32 x 32 patches, 16 windows), in a window block and a full-attention block. Stacking blocks composes
    exactly, so this holds for all 32."""
    torch.manual_seed(0)
    base = Qwen2_5_VLVisionBlock(REAL).eval()
    ias = IASQwenVisionBlock(REAL).eval()
    ias.load_state_dict(base.state_dict(), strict=False)
    assert ias.cross_attention.gate.abs().max() == 0  # zero-initialised
    grid = torch.tensor([[1, 32, 32]])
    window_index, cu_window = get_vision_window_index(grid, 2, REAL.window_size, 14)
    position = _rope(REAL, grid, window_index)
    h, e, s = torch.randn(1024, REAL.hidden_size), torch.randn(1024, REAL.hidden_size), torch.rand(1024)
    with torch.no_grad():
        for cu in (cu_window, get_vision_cu_seqlens(grid)):
            assert torch.equal(ias(h, e, s, cu_seqlens=cu, position_embeddings=position),
                               base(h, cu_seqlens=cu, position_embeddings=position))


def _rope(cfg: Qwen2_5_VLVisionConfig, grid: torch.Tensor, window_index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tower's rotary (cos, sin) per patch, in window order (as the tower's forward makes them)."""
    cos_sin = Qwen2_5_VLVisionRotaryEmbedding(cfg)(torch.zeros(1), get_vision_position_ids(grid, 2))
    return tuple(t.view(-1, 4, t.shape[-1])[window_index].view(-1, t.shape[-1]) for t in cos_sin)


def test_full_depth_tower_with_zero_gates_equals_unmodified_tower() -> None:
    """Real depth (32 blocks, full attention in 7, 15, 23, 31, windows of 112 px) on a real 644 x 448 image
    and a small odd one in one batch; width reduced to 64 for speed."""
    cfg = _small(depth=32, window=112, full=(7, 15, 23, 31))
    base, ias = _pair(cfg)
    grid = torch.cat([torch.tensor([[1, 32, 46]]), _grid(SIZES[1:])])
    x, maps = _inputs(grid)
    with torch.no_grad():
        ref = base(x, grid_thw=grid, output_hidden_states=True)
        out = ias(x, grid_thw=grid, saliency_maps=maps, output_hidden_states=True)
    assert torch.equal(out.pooler_output, ref.pooler_output)
    assert len(out.hidden_states) == len(ref.hidden_states) == 33
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, ref.hidden_states))


def test_fusion_none_is_the_unmodified_tower() -> None:
    cfg = _small()
    assert type(vision_tower(cfg, "none")) is Qwen2_5_VisionTransformerPretrainedModel
    assert isinstance(vision_tower(cfg), IASQwenVisionModel)
    with pytest.raises(ValueError, match="fusion"):
        vision_tower(cfg, "concat")
    with pytest.raises(ValueError, match="saliency_maps"):
        IASQwenVisionModel(cfg)(torch.randn(16, PATCH), grid_thw=torch.tensor([[1, 4, 4]]))


# ---------------------------------------------------------------- saliency per patch: the slow loop


def _bilinear(m: np.ndarray, y: float, x: float) -> float:
    """The map's value at continuous pixel-centre coordinates (torch's align_corners=False convention)."""
    def axis(c: float, n: int) -> tuple[int, int, float]:
        c = max(c, 0.0)
        lo = min(int(math.floor(c)), n - 1)
        return lo, min(lo + 1, n - 1), c - lo

    y0, y1, fy = axis(y, m.shape[0])
    x0, x1, fx = axis(x, m.shape[1])
    top = m[y0, x0] * (1 - fx) + m[y0, x1] * fx
    bottom = m[y1, x0] * (1 - fx) + m[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def _patch_value(m: np.ndarray, r: int, c: int, height: int, width: int) -> float:
    """Mean over patch (r, c)'s pixels of the normalised map resized to height x width."""
    sy, sx = m.shape[0] / height, m.shape[1] / width
    total = 0.0
    for y in range(r * 14, r * 14 + 14):
        for x in range(c * 14, c * 14 + 14):
            total += _bilinear(m, (y + 0.5) * sy - 0.5, (x + 0.5) * sx - 0.5)
    return total / 196


def _processor_order(grid_h: int, grid_w: int) -> list[tuple[int, int]]:
    """(row, col) of every ``pixel_values`` row, read off the Qwen2.5-VL image processor itself: an image of
    exactly its resized size (no resampling) whose patch (r, c) is coloured (r, c, 0)."""
    pixels = np.zeros((grid_h * 14, grid_w * 14, 3), np.uint8)
    for r in range(grid_h):
        for c in range(grid_w):
            pixels[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] = (r, c, 0)
    processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 1, "longest_edge": 10**8})
    out = processor(images=[Image.fromarray(pixels)], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, grid_h, grid_w]]
    mean, std = processor.image_mean, processor.image_std
    rows = out["pixel_values"].double()
    decode = lambda ch: torch.round((rows[:, ch * 392] * std[ch] + mean[ch]) * 255).long()  # noqa: E731
    return list(zip(decode(0).tolist(), decode(1).tolist()))


def _slow_patch_saliency(maps: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    out = []
    for m, (_, gh, gw) in zip(maps.numpy().astype(np.float64), grid.tolist()):
        m = (m - m.min()) / (m.max() - m.min())
        out += [_patch_value(m, r, c, gh * 14, gw * 14) for r, c in _processor_order(gh, gw)]
    return torch.tensor(out, dtype=torch.float32)


def test_patch_saliency_equals_a_per_pixel_loop_in_the_processors_order() -> None:
    grid = _grid(SIZES)  # two odd-sized images
    assert grid.tolist() == [[1, 10, 14], [1, 6, 4]]
    _, maps = _inputs(grid)
    expected = _slow_patch_saliency(maps, grid)
    torch.testing.assert_close(patch_saliency(maps, grid, 14, 2), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(patch_saliency(list(maps), grid, 14, 2), expected, rtol=0, atol=1e-5)
    # no saliency information (constant, non-finite) is the uniform map, all ones
    flat = torch.stack([torch.full((14, 14), 3.0), torch.full((14, 14), float("nan"))])
    assert torch.equal(patch_saliency(flat, grid, 14, 2), torch.ones(int(grid.prod(-1).sum())))


def test_saliency_meets_its_patch_in_the_forwards_window_order() -> None:
    """Inside the tower (windows of 4 x 4 patches, so both images span several windows), every position's
    saliency is its own patch's value from the slow loop; the patch each position holds is read off the
    image tokens the unmodified code laid out."""
    cfg = _small()
    _, ias = _pair(cfg)
    grid = _grid(SIZES)
    x, maps = _inputs(grid)
    seen = {}
    ias.blocks[0].register_forward_pre_hook(lambda _, args: seen.update(h=args[0], e=args[1], s=args[2]))
    with torch.no_grad():
        ias(x, grid_thw=grid, saliency_maps=maps)
        embedded = ias.patch_embed(x)  # [N, D] in the processor's order
    expected = _slow_patch_saliency(maps, grid)
    rows = {tuple(v.tolist()): p for p, v in enumerate(embedded)}
    order = [rows[tuple(v.tolist())] for v in seen["h"]]  # processor row of each position
    assert sorted(order) == list(range(len(order))) and order != list(range(len(order)))  # a real permutation
    assert torch.equal(seen["e"], seen["h"])  # the patch embeddings, in the same order
    torch.testing.assert_close(seen["s"], expected[order], rtol=0, atol=1e-5)


def test_queries_are_the_embedded_saliency_weighted_patches_rms_scaled_by_their_patch() -> None:
    """The saliency token is the tower's patch embedding of the saliency-weighted patch (the embedding is a
    bias-free convolution); its RMSNorm uses the unweighted patch's RMS, so the weighting survives."""
    cfg = _small(depth=1)
    torch.manual_seed(0)
    tower = IASQwenVisionModel(cfg)
    xattn = tower.blocks[0].cross_attention
    torch.nn.init.normal_(xattn.norm_query.weight)
    x, s = torch.randn(16, PATCH), torch.rand(16)
    inputs = {}
    xattn.q_proj.register_forward_pre_hook(lambda _, args: inputs.update(q=args[0]))
    e = tower.patch_embed(x)
    with torch.no_grad():
        xattn(e, e, s, torch.tensor([0, 16], dtype=torch.int32), (torch.ones(16, 16), torch.zeros(16, 16)))
        weighted = tower.patch_embed(x * s[:, None])  # the saliency tokens
    torch.testing.assert_close(weighted, e * s[:, None], rtol=1e-5, atol=1e-6)
    rms = e.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt()
    torch.testing.assert_close(inputs["q"], xattn.norm_query.weight * weighted * rms, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- segments: windows, full attention, images


def _segment_attention_loop(xattn: QwenSaliencyCrossAttention, image: torch.Tensor, patches: torch.Tensor,
                            saliency: torch.Tensor, cu_seqlens: torch.Tensor,
                            position: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per query token, softmax attention over exactly the tokens of its own segment, each key's logit plus
    log(its saliency + floor)."""
    n, h = image.shape[0], xattn.num_heads
    q = xattn.q_proj(xattn.norm_query(patches) * saliency[:, None]).view(n, h, -1)
    k = xattn.k_proj(xattn.norm_context(image)).view(n, h, -1)
    v = xattn.v_proj(xattn.norm_context(image)).view(n, h, -1)
    q, k = apply_rotary_pos_emb_vision(q, k, *position)
    bounds = cu_seqlens.tolist()
    segment = [max(i for i, b in enumerate(bounds) if b <= t) for t in range(n)]
    out = torch.zeros(n, h, q.shape[-1])
    for t in range(n):
        keys = [u for u in range(n) if segment[u] == segment[t]]
        for head in range(h):
            weights = torch.softmax(torch.stack([q[t, head] @ k[u, head] / math.sqrt(q.shape[-1])
                                                 + math.log(saliency[u] + PRIOR_FLOOR) for u in keys]), 0)
            out[t, head] = sum(w * v[u, head] for w, u in zip(weights, keys))
    return xattn.gate * xattn.o_proj(out.reshape(n, -1))


def test_cross_attention_attends_within_its_segments_only() -> None:
    cfg = _small()
    torch.manual_seed(0)
    tower = IASQwenVisionModel(cfg)
    xattn = tower.blocks[0].cross_attention
    for p in xattn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    grid = _grid(SIZES)
    n = int(grid.prod(-1).sum())
    window_index, cu_window = get_vision_window_index(grid, 2, cfg.window_size, 14)
    position = _rope(cfg, grid, window_index)
    image, patches, saliency = torch.randn(n, 64), torch.randn(n, 64), torch.rand(n)
    with torch.no_grad():
        for cu in (cu_window, get_vision_cu_seqlens(grid)):  # the window blocks' segments, then whole images
            torch.testing.assert_close(xattn(image, patches, saliency, cu, position),
                                       _segment_attention_loop(xattn, image, patches, saliency, cu, position),
                                       rtol=1e-4, atol=1e-5)


def test_each_block_cross_attends_over_its_own_attention_segments() -> None:
    cfg = _small()  # blocks 0, 2 windowed, 1, 3 full attention
    _, ias = _pair(cfg)
    grid = _grid(SIZES)
    x, maps = _inputs(grid)
    seen: dict[str, list] = {"attn": [], "cross": []}
    for block in ias.blocks:
        block.attn.register_forward_hook(lambda m, a, kw, o: seen["attn"].append(kw["cu_seqlens"]), with_kwargs=True)
        block.cross_attention.register_forward_hook(lambda m, a, o: seen["cross"].append(a[3]))
    with torch.no_grad():
        ias(x, grid_thw=grid, saliency_maps=maps)
    full, window = get_vision_cu_seqlens(grid), get_vision_window_index(grid, 2, cfg.window_size, 14)[1]
    assert len(window) > len(full) == 3  # two images, several windows each
    for i, (attn, cross) in enumerate(zip(seen["attn"], seen["cross"])):
        assert torch.equal(cross, attn) and torch.equal(cross, full if i in cfg.fullatt_block_indexes else window)


def test_images_in_a_batch_never_see_each_others_saliency() -> None:
    cfg = _small()
    _, ias = _pair(cfg)
    _open_gates(ias)
    grid = _grid(SIZES)
    x, maps = _inputs(grid)
    other = maps.clone()
    other[1] = torch.rand(14, 14)
    tokens = (grid.prod(-1) // 4).tolist()  # merged tokens per image
    with torch.no_grad():
        a = ias(x, grid_thw=grid, saliency_maps=maps).pooler_output.split(tokens)
        b = ias(x, grid_thw=grid, saliency_maps=other).pooler_output.split(tokens)
        alone = ias(x[: int(grid[0].prod())], grid_thw=grid[:1], saliency_maps=maps[:1]).pooler_output
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1], atol=1e-4)
    torch.testing.assert_close(a[0], alone, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- training


def test_open_gates_make_saliency_matter_and_gradients_reach_every_cross_attention_parameter() -> None:
    cfg = _small()
    _, ias = _pair(cfg)
    _open_gates(ias)
    grid = _grid(SIZES)
    x, maps = _inputs(grid)
    out = ias(x, grid_thw=grid, saliency_maps=maps).pooler_output
    assert not torch.allclose(out, ias(x, grid_thw=grid, saliency_maps=torch.rand_like(maps)).pooler_output, atol=1e-4)
    out.square().mean().backward()
    params = cross_attention_parameters(ias)
    assert len(params) == cfg.depth * 11  # gate, 2 RMSNorm weights, q/k/v/o weights + biases
    for name, p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_zero_gates_still_pass_gradient_to_the_gates() -> None:
    cfg = _small()
    _, ias = _pair(cfg)
    grid = _grid(SIZES)
    x, maps = _inputs(grid)
    ias(x, grid_thw=grid, saliency_maps=maps).pooler_output.square().mean().backward()
    for block in ias.blocks:
        assert block.cross_attention.gate.grad.abs().sum() > 0
        assert block.cross_attention.q_proj.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant: bool) -> None:
    cfg = _small()
    _, ias = _pair(cfg)
    _open_gates(ias)
    ias.train()
    grid = _grid(SIZES)
    x, maps = _inputs(grid)
    calls = []
    ias.blocks[0].cross_attention.register_forward_hook(lambda *_: calls.append(1))

    def grads() -> dict[str, torch.Tensor]:
        ias.zero_grad()
        calls.clear()
        ias(x, grid_thw=grid, saliency_maps=maps).pooler_output.square().mean().backward()
        return {n: p.grad.clone() for n, p in ias.named_parameters() if p.grad is not None}

    plain = grads()
    assert len(calls) == 1
    ias.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    checkpointed = grads()
    assert len(calls) == 2  # the block was recomputed in backward
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(ias.parameters()))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
