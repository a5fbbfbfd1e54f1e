"""The streaming safetensors writer; oracle: the safetensors library reading what it wrote."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from storage.safetensors_stream import TensorSpec, plan_shards, shard_file_names, write_index, write_shard


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(5, 3, generator=g).to(torch.bfloat16), "b": torch.randn(7, generator=g),
            "c.scalar": torch.tensor(3.5, dtype=torch.float16), "d.ids": torch.arange(11, dtype=torch.int64),
            "e.mask": torch.tensor([True, False, True]), "f.empty": torch.zeros(0, 4)}


def test_shards_read_back_exactly_with_the_safetensors_library(tmp_path: Path) -> None:
    tensors = _tensors()
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    shards = plan_shards(specs, max_bytes=40)
    # 30 B | 28 + 2 B | 88 B (over the limit: alone) | 3 + 0 B
    assert [[s.name for s in shard] for shard in shards] == [["a.weight"], ["b", "c.scalar"], ["d.ids"],
                                                             ["e.mask", "f.empty"]]
    names = shard_file_names(len(shards))
    assert names[0] == "model-00001-of-00004.safetensors" and shard_file_names(1) == ["model.safetensors"]
    for shard, name in zip(shards, names):
        write_shard(tmp_path / name, shard, (tensors[s.name] for s in shard))
    write_index(tmp_path, shards, names)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
    for name in names:
        with safe_open(str(tmp_path / name), framework="pt") as fh:
            assert fh.metadata() == {"format": "pt"}
        for key, value in load_file(tmp_path / name).items():
            assert index["weight_map"][key] == name
            assert value.dtype == tensors[key].dtype and torch.equal(value, tensors[key]), key
    header_bytes = int.from_bytes((tmp_path / names[0]).read_bytes()[:8], "little")
    assert header_bytes % 8 == 0  # header padded: the data starts 8-byte aligned


def test_a_tensor_that_does_not_match_its_plan_is_refused(tmp_path: Path) -> None:
    spec = TensorSpec("x", torch.float32, (2, 2))
    with pytest.raises(ValueError, match="planned"):
        write_shard(tmp_path / "x.safetensors", [spec], [torch.zeros(2, 3)])
    with pytest.raises(ValueError):  # one tensor short
        write_shard(tmp_path / "y.safetensors", [spec, spec], [torch.zeros(2, 2)])
