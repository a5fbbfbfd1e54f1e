"""LayerCAM at one layer (paper Eq. 2-5; Jiang et al., TIP 2021), batched, in torch.

M^c = ReLU( sum_k ReLU(dy^c/dA^k) * A^k ) per image, with c = argmax of the class scores
unless given. One forward pass and one ``autograd.grad`` of the summed target scores with
respect to the layer output. The forward up to the layer runs without autograd; its output
becomes a detached leaf that requires grad, so the graph (and the backward) covers only
the layers after it. dy^c/dA is unchanged by this. Samples are independent in eval mode,
so the gradient of the batch sum gives every image its own gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn


@dataclass
class LayerCamOutput:
    maps: Tensor  # [B,h,w] float32, raw (not normalised, not resized)
    category: Tensor  # [B] int64, the class c each map explains
    logits: Tensor  # [B,K] class scores of the same forward pass


def layercam(model: nn.Module, layer: nn.Module, x: Tensor, category: Tensor | None = None,
             score_fn: Callable[[Tensor], Tensor] | None = None) -> LayerCamOutput:
    """Raw LayerCAM maps of ``layer``'s output (a [B,K,h,w] tensor) for ``x`` [B,3,H,W].

    ``score_fn`` maps the model output to class scores [B,K] (default: the output itself).
    Put the model in eval mode first (dropout / drop-path would couple nothing but add noise).
    """
    taps: list[Tensor] = []

    def tap(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if not isinstance(output, Tensor):
            raise TypeError(f"LayerCAM target must output a tensor, got {type(output).__name__}")
        leaf = output.detach().requires_grad_(True)  # A [B,K,h,w]
        taps.append(leaf)
        torch.set_grad_enabled(True)  # record the graph from here on; no_grad's exit restores the mode
        return leaf

    handle = layer.register_forward_hook(tap)
    try:
        with torch.no_grad():
            out = model(x)
            if len(taps) != 1:
                raise RuntimeError(f"target layer ran {len(taps)} times in one forward (expected once)")
            scores = score_fn(out) if score_fn is not None else out  # [B,K]
            if category is None:
                category = scores.detach().argmax(dim=1)
            category = category.to(device=scores.device, dtype=torch.int64)
            target = scores.gather(1, category[:, None]).sum()
            (grad,) = torch.autograd.grad(target, taps[0])  # [B,K,h,w]
    finally:
        handle.remove()
    activation = taps[0].detach()
    maps = torch.relu((torch.relu(grad) * activation).sum(dim=1))  # [B,h,w]
    return LayerCamOutput(maps=maps.float(), category=category, logits=scores.detach())
