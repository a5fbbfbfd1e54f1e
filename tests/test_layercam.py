"""Our batched LayerCAM against pytorch-grad-cam's LayerCAM raw map (before its scaling/resize)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import LayerCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from stages.saliency.eat import build_eat, eat_score, target_layer
from stages.saliency.layercam import layercam


def gradcam_raw(model: nn.Module, layer: nn.Module, x: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """pytorch-grad-cam's own map: its get_cam_image on its captured activations/gradients, then ReLU."""
    cam = LayerCAM(model=model, target_layers=[layer])
    cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
    acts = cam.activations_and_grads.activations[0].numpy()
    grads = cam.activations_and_grads.gradients[0].numpy()
    raw = cam.get_cam_image(x, layer, None, acts, grads, eigen_smooth=False)
    cam.activations_and_grads.release()
    return torch.from_numpy(np.maximum(raw, 0))


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return build_eat("nano")


def test_matches_gradcam_for_a_batch(model: nn.Module) -> None:
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    layer = target_layer(model)
    ours = layercam(model, layer, x)
    with torch.no_grad():
        logits = model(x)
    assert ours.category.tolist() == logits.argmax(1).tolist()
    assert torch.allclose(ours.logits, logits, atol=1e-6)
    expected = gradcam_raw(model, layer, x, ours.category.tolist())
    assert ours.maps.shape == (3, 14, 14) and ours.maps.dtype == torch.float32
    assert ours.maps.max() > 0
    assert (ours.maps - expected).abs().max() <= 1e-6 * max(1.0, expected.abs().max().item())


def test_given_category_and_other_layer(model: nn.Module) -> None:
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    layer = target_layer(model, "stages.1")
    category = torch.tensor([7, 2])
    ours = layercam(model, layer, x, category=category)
    assert ours.category.tolist() == [7, 2] and ours.maps.shape == (2, 28, 28)
    expected = gradcam_raw(model, layer, x, [7, 2])
    assert (ours.maps - expected).abs().max() <= 1e-6 * max(1.0, expected.abs().max().item())


def test_score_fn_and_no_side_effects(model: nn.Module) -> None:
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    layer = target_layer(model)
    # score_fn: a scalar "class" (the EAT score) as the single target
    ours = layercam(model, layer, x, score_fn=lambda out: eat_score(out)[:, None])
    assert ours.category.tolist() == [0, 0] and ours.logits.shape == (2, 1)
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients
    assert torch.is_grad_enabled()  # grad mode restored
    assert not layer._forward_hooks  # hook removed
    wrapped = nn.Sequential(model, _Lambda(lambda out: eat_score(out)[:, None]))
    expected = gradcam_raw(wrapped, layer, x, [0, 0])
    assert (ours.maps - expected).abs().max() <= 1e-6 * max(1.0, expected.abs().max().item())


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)
