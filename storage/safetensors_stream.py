"""Sharded safetensors written one tensor at a time.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once (and copies each to bytes),
so a converter holding a whole shard would need twice the shard size. Here the header is written from the
planned names, dtypes and shapes, then each tensor's bytes are appended as it is produced: peak memory is
about one tensor. Format (github.com/huggingface/safetensors): a little-endian u64 header length, the JSON
header ``{name: {dtype, shape, data_offsets}, "__metadata__": {...}}`` padded with spaces to a multiple of 8,
then the tensors' raw little-endian bytes, back to back in header order.
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
INDEX_NAME = "model.safetensors.index.json"

if sys.byteorder != "little":  # safetensors stores little-endian bytes; torch tensors use the host order
    raise ImportError("storage.safetensors_stream writes raw tensor bytes and needs a little-endian host")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(specs: Iterable[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Split ``specs`` in order into shards of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for spec in specs:
        if current and size + spec.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    if current:
        shards.append(current)
    return shards


def shard_file_names(n: int) -> list[str]:
    """transformers' names: ``model.safetensors`` alone, else ``model-00001-of-0000N.safetensors``."""
    return ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_shard(path: Path, specs: list[TensorSpec], tensors: Iterable[torch.Tensor],
                metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (produced lazily, in ``specs`` order, each matching its spec) as one safetensors file."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for spec, tensor in zip(specs, tensors, strict=True):
            if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                raise ValueError(f"{spec.name}: got {tensor.dtype} {tuple(tensor.shape)}, "
                                 f"planned {spec.dtype} {spec.shape}")
            fh.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        fh.flush()
        os.fsync(fh.fileno())


def write_index(directory: Path, shards: list[list[TensorSpec]], names: list[str]) -> None:
    """``model.safetensors.index.json``: total size and which file holds each tensor (only for > 1 shard)."""
    weight_map = {spec.name: name for shard, name in zip(shards, names, strict=True) for spec in shard}
    total = sum(spec.nbytes for shard in shards for spec in shard)
    (Path(directory) / INDEX_NAME).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
