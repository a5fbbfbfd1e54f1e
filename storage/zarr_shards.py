"""Chunks of a sharded Zarr v3 array read straight from its shard files, in the calling thread.

zarr's reads run on its event-loop thread (file IO on a further thread): two thread hand-offs per
read, about 1 ms a map, several ms when the CPU is busy (a training node's loader workers), and
about 0.12 ms a chunk when a whole shard of small chunks is read. The saliency store writes its
``maps`` in one fixed layout: shards of ``chunk_shape`` chunks along the first axis, one chunk per
row, inner codecs bytes (little endian) + zstd, the shard index (offset, nbytes) uint64 pairs with
bytes + crc32c at the end, "/" chunk keys. :func:`open_shard_files` accepts exactly that layout
(anything else: None, and the caller reads through zarr); the tests hold every read against zarr's.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import google_crc32c  # zarr's own checksum dependency
import numpy as np
from numcodecs import Zstd

EMPTY = np.iinfo(np.uint64).max  # index entry of a chunk never written (it reads as the fill value)
_BYTES_LE = {"name": "bytes", "configuration": {"endian": "little"}}


class ShardFiles:
    """Rows of a 3-d array [N, h, w] sharded along N, one row per chunk."""

    def __init__(self, array_dir: Path, shard_rows: int, row_shape: tuple[int, int], dtype: np.dtype,
                 fill_value: float) -> None:
        self.array_dir, self.shard_rows, self.row_shape = Path(array_dir), shard_rows, row_shape
        self.dtype, self.fill_value = np.dtype(dtype), fill_value
        self._stored = self.dtype.newbyteorder("<")
        self._zstd = Zstd()
        self._index_bytes = 16 * shard_rows + 4

    def _path(self, shard: int) -> Path:
        return self.array_dir / "c" / str(shard) / "0" / "0"

    def _index(self, tail: bytes, shard: int) -> np.ndarray:
        """[shard_rows, 2] (offset, nbytes) from the shard's last bytes, checksum verified."""
        body, crc = tail[:-4], tail[-4:]
        if np.uint32(google_crc32c.value(body)).tobytes() != crc:
            raise ValueError(f"{self._path(shard)}: shard index checksum mismatch (damaged file)")
        return np.frombuffer(body, "<u8").reshape(self.shard_rows, 2)

    def _decode(self, chunk: bytes) -> np.ndarray:
        """One chunk's bytes -> [h, w] (read-only view of the decompressed bytes)."""
        return np.frombuffer(self._zstd.decode(chunk), self._stored).reshape(self.row_shape)

    def _fill(self, *shape: int) -> np.ndarray:
        return np.full((*shape, *self.row_shape), self.fill_value, self.dtype)

    def read_row(self, shard: int, i: int) -> np.ndarray:
        """Row ``i`` of ``shard``: [h, w] (the fill value where never written)."""
        try:
            fd = os.open(self._path(shard), os.O_RDONLY)
        except FileNotFoundError:
            return self._fill()
        try:
            size = os.fstat(fd).st_size
            offset, nbytes = self._index(os.pread(fd, self._index_bytes, size - self._index_bytes), shard)[i]
            if offset == EMPTY:
                return self._fill()
            return self._decode(os.pread(fd, int(nbytes), int(offset))).astype(self.dtype)  # a writable copy
        finally:
            os.close(fd)

    def read_shard(self, shard: int) -> np.ndarray:
        """Every row of ``shard``: [shard_rows, h, w], one file read."""
        out = self._fill(self.shard_rows)
        try:
            raw = self._path(shard).read_bytes()
        except FileNotFoundError:
            return out
        index = self._index(raw[-self._index_bytes:], shard)
        for i, (offset, nbytes) in enumerate(index.tolist()):
            if offset != EMPTY:
                out[i] = self._decode(raw[offset:offset + nbytes])
        return out


def open_shard_files(array_dir: Path) -> ShardFiles | None:
    """A :class:`ShardFiles` for the zarr array at ``array_dir`` if it has exactly the supported layout, else None."""
    try:
        meta = json.loads((Path(array_dir) / "zarr.json").read_text())
        (sharding,) = meta["codecs"]
        cfg = sharding["configuration"]
        shard_shape, chunk_shape = meta["chunk_grid"]["configuration"]["chunk_shape"], cfg["chunk_shape"]
        inner = cfg["codecs"]
        supported = (
            meta["zarr_format"] == 3 and meta["node_type"] == "array" and len(meta["shape"]) == 3
            and meta["chunk_grid"]["name"] == "regular" and not meta.get("storage_transformers")
            and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
            and sharding["name"] == "sharding_indexed" and cfg.get("index_location", "end") == "end"
            and cfg["index_codecs"] == [_BYTES_LE, {"name": "crc32c"}]
            and len(inner) == 2 and inner[0] == _BYTES_LE and inner[1]["name"] == "zstd"
            and chunk_shape[0] == 1 and chunk_shape[1:] == shard_shape[1:] == meta["shape"][1:]
            and isinstance(meta["fill_value"], (int, float))
        )
        dtype = np.dtype(meta["data_type"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not supported or dtype.kind not in "fiu":
        return None
    return ShardFiles(Path(array_dir), shard_shape[0], tuple(shard_shape[1:]), dtype, meta["fill_value"])
