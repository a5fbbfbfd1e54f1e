"""EAT: DAT-Base with EAT's two changes (interest points, offset damping), re-implemented.

Reads top to bottom: channel LayerNorm -> MLP -> window attention (L) -> shifted window
attention (S) -> deformable attention with EAT's reference points (D) -> stage -> model ->
variants, weights, preprocessing and the aesthetic score. State-dict keys, shapes and order
equal the official checkpoints (woshidandan/Image-Aesthetics-and-Quality-Assessment,
AVA/models). One deliberate difference: the official D block averages its reference points
over the batch; here they are computed per image, so an image's outputs do not depend on
its batch (identical to the official model at batch size 1).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from stages.saliency import INPUT_SIZE

PATCH_SIZE = 4
WINDOW_SIZE = 7
MLP_EXPANSION = 4
OFFSET_RANGE_FACTOR = 2  # official offset_range_factor of the D stages
OFFSET_KERNELS = (9, 7, 5, 3)  # depthwise offset-conv kernel, chosen by stage index
DAMPING = 0.25  # EAT: offsets whose sign disagrees with the reference are scaled by this
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@torch.no_grad()
def trunc_normal_(tensor: Tensor, std: float = 1.0, mean: float = 0.0, a: float = -2.0, b: float = 2.0) -> Tensor:
    """Fill ``tensor`` from N(mean, std^2) truncated to [a, b] by the inverse CDF: one uniform draw per value, as
    timm's ``trunc_normal_`` (torch >= 2.14's own rejection sampler draws differently, so seeds would change)."""
    def cdf(x: float) -> float:  # standard normal
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    lo, hi = cdf((a - mean) / std), cdf((b - mean) / std)
    tensor.uniform_(2 * lo - 1, 2 * hi - 1).erfinv_()  # a standard normal truncated to the bounds, / sqrt(2)
    return tensor.mul_(std * math.sqrt(2.0)).add_(mean).clamp_(min=a, max=b)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): in training, zero a residual branch per sample with probability
    ``p`` and scale the kept ones by 1 / (1 - p); identity in eval (timm's ``DropPath``, without importing timm)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # [B,1,...]
        return x * mask.div_(keep) if keep > 0.0 else x * mask


class LayerNormProxy(nn.Module):
    """LayerNorm over the channels of an NCHW tensor."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MLP(nn.Module):
    """Per-pixel Linear -> GELU -> Linear (x4 expansion); keys ``chunk.linear{1,2}``."""

    def __init__(self, dim: int, expansion: int = MLP_EXPANSION):
        super().__init__()
        self.chunk = nn.Sequential(
            OrderedDict(
                linear1=nn.Linear(dim, dim * expansion),
                act=nn.GELU(),
                linear2=nn.Linear(dim * expansion, dim),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.chunk(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # [B,C,H,W]


def relative_position_index(window: int) -> Tensor:
    """[w*w, w*w] index into a (2w-1)^2 bias table (Swin convention)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # [N,N,2]
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(fmap: int, window: int, shift: int) -> Tensor:
    """[nW, w*w, w*w]: 0 within a region, -100 across regions of the rolled feature map."""
    regions = torch.zeros(fmap, fmap)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, (hs, ws) in enumerate((h, w) for h in bounds for w in bounds):
        regions[hs, ws] = i
    r = fmap // window
    windows = regions.reshape(r, window, r, window).permute(0, 2, 1, 3).reshape(r * r, window * window)
    diff = windows[:, None, :] - windows[:, :, None]  # [nW,N,N]
    return torch.where(diff != 0, -100.0, 0.0)


class WindowAttention(nn.Module):
    """L block: multi-head self-attention inside non-overlapping 7x7 windows, relative bias."""

    def __init__(self, dim: int, heads: int, window: int = WINDOW_SIZE):
        super().__init__()
        self.heads, self.window = heads, window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        trunc_normal_(self.relative_position_bias_table, std=0.01)
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.proj_qkv = nn.Linear(dim, 3 * dim)
        self.proj_out = nn.Linear(dim, dim)

    def attend(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        w, r1, r2 = self.window, H // self.window, W // self.window
        n = w * w
        win = x.reshape(B, C, r1, w, r2, w).permute(0, 2, 4, 3, 5, 1).reshape(B * r1 * r2, n, C)  # [B*nW,n,C]
        q, k, v = self.proj_qkv(win).reshape(-1, n, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, self.heads).permute(2, 0, 1)  # [h,n,n]
        if mask is not None:  # [nW,n,n] -> per window, broadcast over batch and heads
            bias = (bias[None] + mask[:, None]).repeat(B, 1, 1, 1)  # [B*nW,h,n,n]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B*nW,h,n,c]
        out = self.proj_out(out.transpose(1, 2).reshape(-1, n, C))  # [B*nW,n,C]
        return out.reshape(B, r1, r2, w, w, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)

    def forward(self, x: Tensor) -> Tensor:
        return self.attend(x)


class ShiftedWindowAttention(WindowAttention):
    """S block: window attention on the map rolled by ceil(w/2) = 4 (official; Swin uses 3)."""

    def __init__(self, dim: int, heads: int, fmap: int, window: int = WINDOW_SIZE):
        super().__init__(dim, heads, window)
        self.shift = math.ceil(window / 2)
        self.register_buffer("attn_mask", shifted_window_mask(fmap, window, self.shift))

    def forward(self, x: Tensor) -> Tensor:
        s = self.shift
        y = self.attend(torch.roll(x, shifts=(-s, -s), dims=(2, 3)), self.attn_mask)
        return torch.roll(y, shifts=(s, s), dims=(2, 3))


def pixel_centres(h: int, w: int) -> Tensor:
    """[h, w, 2] (y, x) pixel centres normalised to [-1, 1]."""
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w * 2 - 1
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)


class DeformableAttention(nn.Module):
    """D block: DAT deformable attention with EAT's interest points and offset damping.

    Every query attends to H*W keys/values sampled from the input at positions
    pos = gamma * offset + reference, where reference = tanh(ref_point14(x)) is predicted per
    image (EAT change 1) and gamma = 1 where offset and reference agree in sign in both
    coordinates, else 0.25 (EAT change 2). Coordinates are (y, x) in [-1, 1].
    """

    def __init__(self, dim: int, heads: int, groups: int, fmap: int, stage_index: int):
        super().__init__()
        self.heads, self.groups, self.fmap = heads, groups, fmap
        cg, k = dim // groups, OFFSET_KERNELS[stage_index]
        self.rpe_table = nn.Parameter(torch.zeros(heads, 2 * fmap - 1, 2 * fmap - 1))
        trunc_normal_(self.rpe_table, std=0.01)
        self.conv_offset = nn.Sequential(
            nn.Conv2d(cg, cg, k, 1, k // 2, groups=cg),
            LayerNormProxy(cg),
            nn.GELU(),
            nn.Conv2d(cg, 2, 1, bias=False),
        )
        self.proj_q, self.proj_k, self.proj_v, self.proj_out = (nn.Conv2d(dim, dim, 1) for _ in range(4))
        self.ref_point14 = nn.Conv2d(dim, 2, 1)
        self.register_buffer("offset_range", torch.tensor([1.0 / fmap, 1.0 / fmap]).view(1, 2, 1, 1), persistent=False)
        self.register_buffer("query_grid", pixel_centres(fmap, fmap).view(fmap * fmap, 1, 2), persistent=False)

    def sampling_points(self, x: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        """x, q [B,C,H,W] -> (positions, references), both [B*g,H,W,2] (y, x)."""
        B, C, H, W = x.shape
        offset = self.conv_offset(q.reshape(B * self.groups, C // self.groups, H, W))  # [B*g,2,H,W]
        offset = offset.tanh().mul(self.offset_range).mul(OFFSET_RANGE_FACTOR).permute(0, 2, 3, 1)  # [B*g,H,W,2]
        reference = self.ref_point14(x).tanh().permute(0, 2, 3, 1)  # [B,H,W,2], per image
        reference = reference.repeat_interleave(self.groups, dim=0)  # [B*g,H,W,2]
        agree = (offset * reference > 0).all(dim=-1, keepdim=True)  # [B*g,H,W,1]
        gamma = torch.where(agree, 1.0, DAMPING)  # a constant for autograd, as official
        return offset * gamma + reference, reference

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        g, h, N = self.groups, self.heads, H * W
        q = self.proj_q(x)
        pos, _ = self.sampling_points(x, q)  # [B*g,H,W,2]
        sampled = F.grid_sample(
            x.reshape(B * g, C // g, H, W), pos.flip(-1), mode="bilinear", align_corners=True
        ).reshape(B, C, H, W)  # keys are sampled from x, not q
        k, v = self.proj_k(sampled), self.proj_v(sampled)

        # relative position bias, bilinearly sampled at (query - key position) / 2
        displacement = (self.query_grid - pos.reshape(B * g, 1, N, 2)).mul(0.5)  # [B*g,HW,N,2]
        table = self.rpe_table.reshape(g, h // g, 2 * H - 1, 2 * W - 1).repeat(B, 1, 1, 1)  # [B*g,h/g,2H-1,2W-1]
        bias = F.grid_sample(table, displacement.flip(-1), mode="bilinear", align_corners=True)  # [B*g,h/g,HW,N]

        def heads(t: Tensor) -> Tensor:  # [B,C,H,W] -> [B,h,HW,c]
            return t.reshape(B, h, C // h, N).transpose(2, 3)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=bias.reshape(B, h, N, N))
        return self.proj_out(out.transpose(2, 3).reshape(B, C, H, W))  # [B,C,H,W]


class Stage(nn.Module):
    """`depth` pre-norm blocks: x += attn(LN(x)); x += mlp(LN(x)). Returns a tensor."""

    def __init__(self, dim: int, depth: int, spec: tuple[str, ...], heads: int, groups: int, fmap: int,
                 stage_index: int, drop_path: list[float]):
        super().__init__()
        self.layer_norms = nn.ModuleList(LayerNormProxy(dim) for _ in range(2 * depth))
        self.mlps = nn.ModuleList(MLP(dim) for _ in range(depth))
        self.attns = nn.ModuleList()
        for kind in spec:
            if kind == "L":
                self.attns.append(WindowAttention(dim, heads))
            elif kind == "S":
                self.attns.append(ShiftedWindowAttention(dim, heads, fmap))
            elif kind == "D":
                self.attns.append(DeformableAttention(dim, heads, groups, fmap, stage_index))
            else:
                raise ValueError(f"unknown block kind {kind!r} (expected L, S or D)")
        self.drop_path = nn.ModuleList(DropPath(p) if p > 0 else nn.Identity() for p in drop_path)

    def forward(self, x: Tensor) -> Tensor:
        for d, (attn, mlp, drop) in enumerate(zip(self.attns, self.mlps, self.drop_path)):
            x = x + drop(attn(self.layer_norms[2 * d](x)))
            x = x + drop(mlp(self.layer_norms[2 * d + 1](x)))
        return x  # [B,C,H,W]


class EAT(nn.Module):
    """Patch embed -> 4 stages (2x down-projection between) -> LN -> GAP -> Linear (raw outputs)."""

    def __init__(self, dims: tuple[int, ...], depths: tuple[int, ...], heads: tuple[int, ...],
                 groups: tuple[int, ...], stage_spec: tuple[tuple[str, ...], ...], num_classes: int = 10,
                 drop_path_rate: float = 0.0):
        super().__init__()
        for i in range(3):
            if dims[i + 1] != 2 * dims[i]:
                raise ValueError(f"dims must double from stage to stage (official layout), got {dims}")
        self.patch_proj = nn.Sequential(nn.Conv2d(3, dims[0], PATCH_SIZE, PATCH_SIZE), LayerNormProxy(dims[0]))
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        fmap = INPUT_SIZE // PATCH_SIZE
        self.stages = nn.ModuleList()
        for i in range(4):
            start = sum(depths[:i])
            self.stages.append(Stage(dims[i], depths[i], tuple(stage_spec[i]), heads[i], groups[i], fmap, i,
                                     rates[start:start + depths[i]]))
            fmap //= 2
        self.down_projs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dims[i], dims[i + 1], 2, 2, bias=False), LayerNormProxy(dims[i + 1]))
            for i in range(3)
        )
        self.cls_norm = LayerNormProxy(dims[-1])
        self.cls_head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"EAT takes {INPUT_SIZE}x{INPUT_SIZE} inputs, got {tuple(x.shape[-2:])}")
        x = self.patch_proj(x)  # [B,C0,56,56]
        for i, stage in enumerate(self.stages):
            x = stage(x)  # [B,Ci,Hi,Wi]
            if i < 3:
                x = self.down_projs[i](x)  # [B,2Ci,Hi/2,Wi/2]
        x = self.cls_norm(x).mean(dim=(2, 3))  # [B,C3]
        return self.cls_head(x)  # [B,num_classes]

    def forward_with_points(self, x: Tensor) -> tuple[Tensor, list[list[Tensor | None]], list[list[Tensor | None]]]:
        """Official return structure: (logits, positions, references); D entries [B,g,H,W,2], else None."""
        positions: list[list[Tensor | None]] = [[None] * len(s.attns) for s in self.stages]
        references: list[list[Tensor | None]] = [[None] * len(s.attns) for s in self.stages]
        handles = []
        for i, stage in enumerate(self.stages):
            for d, attn in enumerate(stage.attns):
                if isinstance(attn, DeformableAttention):
                    def record(module: DeformableAttention, args: tuple[Tensor], i: int = i, d: int = d) -> None:
                        (inp,) = args
                        pos, ref = module.sampling_points(inp, module.proj_q(inp))
                        shape = (inp.shape[0], module.groups, *inp.shape[-2:], 2)
                        positions[i][d], references[i][d] = pos.reshape(shape), ref.reshape(shape)
                    handles.append(attn.register_forward_pre_hook(record))
        try:
            logits = self(x)
        finally:
            for handle in handles:
                handle.remove()
        return logits, positions, references


def _dat_spec(n_ld: int) -> tuple[tuple[str, ...], ...]:
    return (("L", "S"), ("L", "S"), ("L", "D") * n_ld, ("L", "D"))


VARIANTS: dict[str, dict] = {
    # the official EAT (AVA/configs/dat_base.yaml), 86,878,166 parameters
    "dat_base": dict(dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), heads=(4, 8, 16, 32),
                     groups=(-1, -1, 4, 8), stage_spec=_dat_spec(9), drop_path_rate=0.5),
    # the fixture's tiny official-architecture model (183,598 parameters)
    "tiny": dict(dims=(8, 16, 32, 64), depths=(2, 2, 4, 2), heads=(1, 2, 4, 8),
                 groups=(-1, -1, 2, 4), stage_spec=_dat_spec(2), drop_path_rate=0.5),
    # twice tiny's width (688,054 parameters): the demo's EAT, wide enough to learn which subject the score is about
    "small": dict(dims=(16, 32, 64, 128), depths=(2, 2, 4, 2), heads=(1, 2, 4, 8),
                  groups=(-1, -1, 2, 4), stage_spec=_dat_spec(2), drop_path_rate=0.1),
    # one block per stage except stage 2 (L, D): fastest, for unit tests
    "nano": dict(dims=(8, 16, 32, 64), depths=(1, 1, 2, 1), heads=(1, 2, 4, 8),
                 groups=(-1, -1, 2, 4), stage_spec=(("L",), ("S",), ("L", "D"), ("D",)), drop_path_rate=0.1),
}


def build_eat(variant: str, num_classes: int = 10, drop_path_rate: float | None = None) -> EAT:
    """A randomly initialised EAT (PyTorch default init, as the official code) in eval mode.

    ``drop_path_rate`` overrides the variant's (training only; it does not change the weights' layout).
    """
    if variant not in VARIANTS:
        raise KeyError(f"unknown EAT variant {variant!r}; known: {sorted(VARIANTS)}")
    config = dict(VARIANTS[variant])
    if drop_path_rate is not None:
        config["drop_path_rate"] = drop_path_rate
    return EAT(**config, num_classes=num_classes).eval()


def load_eat_weights(model: EAT, path: Path) -> None:
    """Load an official ``.pth``/``.pt`` (weights_only) or ``.safetensors`` state dict, strictly."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for nest in ("model", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(nest), dict):
                state = state[nest]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        def show(items: list[str]) -> str:
            return ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
        raise ValueError(
            f"{path} does not fit this EAT architecture: {len(missing)} missing keys [{show(missing)}]; "
            f"{len(unexpected)} unexpected keys [{show(unexpected)}]; {len(wrong)} shape mismatches [{show(wrong)}]"
        )
    model.load_state_dict(state, strict=True)


def eat_score(logits: Tensor) -> Tensor:
    """[B,K] raw outputs -> [B] score: sum_k k*out_k for 10 bins (official, no softmax), out_0 for 1."""
    if logits.shape[1] == 1:
        return logits[:, 0]
    weights = torch.arange(1, logits.shape[1] + 1, dtype=logits.dtype, device=logits.device)
    return (logits * weights).sum(dim=1)


def preprocess(img: Image.Image) -> Tensor:
    """RGB image -> [3,224,224]: whole image resized (PIL bicubic, no crop), ImageNet mean/std.

    Follows the official AVA loader: ``image.resize((224, 224))`` then ToTensor + Normalize.
    """
    img = img.convert("RGB").resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(INPUT_SIZE, INPUT_SIZE, 3)
    x = x.permute(2, 0, 1).float().div(255)  # [3,224,224]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def target_layer(model: EAT, name: str = "stages.2") -> nn.Module:
    """The LayerCAM target module (default: output of stage 2, [B,512,14,14] for dat_base)."""
    return model.get_submodule(name)
