"""EAT re-implementation against the official code's recorded outputs (../shared/fixtures/eat)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from stages.saliency.eat import (
    EAT, build_eat, eat_score, load_eat_weights, preprocess, target_layer,
)
from stages.saliency.layercam import layercam

D_BLOCKS = [(2, 1), (2, 3), (3, 1)]


@pytest.fixture(scope="module")
def fixtures(shared_dir: Path) -> Path:
    return shared_dir / "fixtures" / "eat"


@pytest.fixture(scope="module")
def tiny(fixtures: Path) -> EAT:
    model = build_eat("tiny")
    load_eat_weights(model, fixtures / "tiny_state_dict.safetensors")
    return model


@pytest.fixture(scope="module")
def io(fixtures: Path) -> dict[str, torch.Tensor]:
    return load_file(str(fixtures / "tiny_io.safetensors"))


def test_dat_base_state_dict_matches_official_keys(fixtures: Path) -> None:
    official = json.loads((fixtures / "dat_base_keys.json").read_text())
    model = build_eat("dat_base")
    ours = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    assert ours == official["keys"]  # names, shapes, dtypes and order
    assert sum(p.numel() for p in model.parameters()) == official["total_parameters"] == 86_878_166


def test_tiny_matches_fixture_config_and_buffers(fixtures: Path) -> None:
    config = json.loads((fixtures / "tiny_config.json").read_text())
    model = build_eat("tiny")
    assert sum(p.numel() for p in model.parameters()) == config["total_parameters"]
    official = load_file(str(fixtures / "tiny_state_dict.safetensors"))
    ours = model.state_dict()
    assert set(ours) == set(official)
    for key, value in official.items():
        assert ours[key].shape == value.shape, key
        if key.endswith(("relative_position_index", "attn_mask")):  # constructed, not learned
            assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("i", range(4))
def test_outputs_match_official(tiny: EAT, io: dict[str, torch.Tensor], i: int) -> None:
    captured = {}
    handle = tiny.stages[2].register_forward_hook(lambda m, a, out: captured.__setitem__("stage2", out))
    with torch.no_grad():
        logits, positions, references = tiny.forward_with_points(io[f"x_{i}"])
    handle.remove()
    assert (logits - io[f"logits_{i}"]).abs().max() <= 1e-5
    assert (eat_score(logits) - io[f"score_{i}"]).abs().max() <= 1e-5
    assert (captured["stage2"] - io[f"stage2_{i}"]).abs().max() <= 1e-5
    for s, d in D_BLOCKS:
        assert (positions[s][d] - io[f"positions_{i}_stage{s}_block{d}"]).abs().max() <= 1e-6
        assert (references[s][d] - io[f"references_{i}_stage{s}_block{d}"]).abs().max() <= 1e-6
    assert positions[2][0] is None and references[3][0] is None  # L blocks have none, as official


@pytest.mark.parametrize("i", range(4))
def test_layercam_matches_official(tiny: EAT, io: dict[str, torch.Tensor], i: int) -> None:
    out = layercam(tiny, target_layer(tiny), io[f"x_{i}"])
    assert out.category.tolist() == io[f"target_class_{i}"].tolist()
    assert (out.maps - io[f"layercam_{i}"]).abs().max() <= 1e-6
    alt = layercam(tiny, target_layer(tiny), io[f"x_{i}"], category=io[f"target_class_alt_{i}"])
    assert (alt.maps - io[f"layercam_alt_{i}"]).abs().max() <= 1e-6


def test_batch_invariance(tiny: EAT, io: dict[str, torch.Tensor]) -> None:
    x = torch.cat([io[f"x_{i}"] for i in range(4)])
    with torch.no_grad():
        batched = tiny(x)
        alone = torch.cat([tiny(io[f"x_{i}"]) for i in range(4)])
        reversed_ = tiny(x.flip(0)).flip(0)
    assert (batched - alone).abs().max() <= 1e-6
    assert (reversed_ - alone).abs().max() <= 1e-6
    # the official model is batch-coupled: our batched logits follow batch-1, not its batch-4 output
    assert (batched - io["logits_batch4"]).abs().max() > 0.05
    maps = layercam(tiny, target_layer(tiny), x).maps
    assert (maps - torch.cat([io[f"layercam_{i}"] for i in range(4)])).abs().max() <= 1e-6


def test_load_official_pth_with_nesting_and_module_prefix(tiny: EAT, tmp_path: Path, io) -> None:
    state = {f"module.{k}": v for k, v in tiny.state_dict().items()}
    torch.save({"model": state, "epoch": 3}, tmp_path / "eat.pth")
    model = build_eat("tiny")
    load_eat_weights(model, tmp_path / "eat.pth")
    with torch.no_grad():
        assert torch.equal(model(io["x_0"]), tiny(io["x_0"]))


def test_wrong_architecture_names_missing_and_unexpected_keys(tmp_path: Path) -> None:
    nano = build_eat("nano")
    save_file(nano.state_dict(), str(tmp_path / "nano.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \[.*stages\.0\.attns\.1.*unexpected keys") as err:
        load_eat_weights(build_eat("tiny"), tmp_path / "nano.safetensors")
    assert "stages.0.mlps.1.chunk.linear1.weight" in str(err.value)


def test_eat_score_is_official_weighted_sum() -> None:
    logits = torch.tensor([[0.0] * 9 + [1.0], [0.5] * 10])
    assert eat_score(logits).tolist() == [10.0, 27.5]
    assert eat_score(torch.tensor([[3.25]])).tolist() == [3.25]


def test_preprocess_matches_torchvision_pipeline() -> None:
    import torchvision.transforms as T

    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (300, 500, 3), dtype=torch.uint8, generator=gen)
    img = Image.fromarray(pixels.numpy())
    # oracle: the official AVA loader (PIL resize to 224x224, ToTensor, Normalize)
    expected = T.Compose([T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])(
        img.resize((224, 224))
    )
    assert torch.allclose(preprocess(img), expected, atol=1e-6)


def test_rejects_other_input_sizes() -> None:
    with pytest.raises(ValueError, match="224x224"):
        build_eat("nano")(torch.zeros(1, 3, 112, 112))


def test_drop_path_equals_timm() -> None:
    """Our stochastic depth (so EAT needs no timm, whose import pulls in torchvision and torch._dynamo) equals
    timm's DropPath draw for draw: same kept samples and scale in training, identity in eval."""
    timm_layers = pytest.importorskip("timm.layers")
    from stages.saliency.eat import DropPath

    x = torch.randn(64, 3, 5, 5)
    for p in (0.0, 0.3, 1.0):
        ours, theirs = DropPath(p).train(), timm_layers.DropPath(p).train()
        torch.manual_seed(7)
        a = ours(x)
        torch.manual_seed(7)
        torch.testing.assert_close(a, theirs(x), rtol=0, atol=0)
        assert torch.equal(ours.eval()(x), x)


def test_trunc_normal_equals_timm() -> None:
    """The EAT init draws exactly as timm's trunc_normal_ did (same seed, same weights; torch's differs)."""
    timm_layers = pytest.importorskip("timm.layers")
    from stages.saliency.eat import trunc_normal_

    for std, a, b in ((0.02, -2.0, 2.0), (1.0, -0.5, 1.5)):
        torch.manual_seed(3)
        ours = trunc_normal_(torch.empty(4096), std=std, a=a, b=b)
        torch.manual_seed(3)
        torch.testing.assert_close(ours, timm_layers.trunc_normal_(torch.empty(4096), std=std, a=a, b=b), rtol=0, atol=0)
        assert a <= ours.min() and ours.max() <= b
