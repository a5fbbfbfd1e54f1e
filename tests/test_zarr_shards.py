"""Direct shard-file reads against zarr's own reads of the same arrays; other layouts are refused."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BytesCodec, GzipCodec, ShardingCodecIndexLocation, ZstdCodec

from storage.saliency_store import SaliencyStore
from storage.zarr_shards import ShardFiles, open_shard_files

S, SHAPE = 8, (14, 14)


def _array(path: Path, n_shards: int = 3, **kw) -> zarr.Array:
    kw = {"chunks": (1, *SHAPE), "shards": (S, *SHAPE), "dtype": "float32", "fill_value": 0.0, **kw}
    return zarr.create_array(path, shape=(n_shards * S, *SHAPE), **kw)


def _values(seed: int) -> np.ndarray:
    """Shard-sized rows of random maps, an all-zero map, extreme and non-finite values."""
    rng = np.random.default_rng(seed)
    v = (rng.standard_normal((S, *SHAPE)) * 10.0 ** rng.integers(-30, 30, (S, 1, 1))).astype(np.float32)
    v[1] = 0.0
    v[2, 0, :4] = [np.nan, np.inf, -np.inf, -0.0]
    return v


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rows_and_shards_equal_zarr_reads_including_chunks_never_written(tmp_path: Path, dtype: str) -> None:
    array = _array(tmp_path / "maps", dtype=dtype, config={"write_empty_chunks": False})  # all-zero chunks left out
    array[0:S] = _values(0)
    array[S:2 * S] = _values(1)  # shard 2 never written: no file at all
    files = open_shard_files(tmp_path / "maps")
    assert files is not None and files.shard_rows == S
    raw = (tmp_path / "maps" / "c" / "0" / "0" / "0").read_bytes()
    assert np.frombuffer(raw[-4 - 16 * S:-4], "<u8").reshape(S, 2)[1, 0] == np.iinfo(np.uint64).max  # row 1 absent
    for shard in range(3):
        expected = array[shard * S:(shard + 1) * S]
        whole = files.read_shard(shard)
        assert whole.dtype == dtype and whole.tobytes() == expected.tobytes()  # bit for bit, NaN and -0 too
        for i in range(S):
            row = files.read_row(shard, i)
            assert row.flags.writeable and row.tobytes() == expected[i].tobytes()


def test_the_store_writes_the_layout_read_here(tmp_path: Path) -> None:
    """If the store's array settings change, its reads would silently go back to zarr's slower path."""
    store = SaliencyStore.open(tmp_path, "fp", SHAPE, S)
    files = open_shard_files(store.path / "store.zarr" / "maps")
    assert files is not None and (files.shard_rows, files.row_shape) == (S, SHAPE) and isinstance(store._map_files(), ShardFiles)


@pytest.mark.parametrize("layout", [
    {"compressors": GzipCodec()},  # other inner codec
    {"shards": None},  # not sharded
    {"chunks": (2, *SHAPE)},  # two rows per chunk
    {"chunk_key_encoding": {"name": "v2"}},  # other file names
])
def test_other_layouts_are_refused_and_the_store_falls_back_to_zarr(tmp_path: Path, layout: dict) -> None:
    store = SaliencyStore.open(tmp_path, "fp", SHAPE, S)
    store.plan([(f"{i:064x}", "x") for i in range(S)])
    maps = store.path / "store.zarr" / "maps"
    values = _values(3)
    array = _array(maps, n_shards=1, overwrite=True, **layout)  # replace the maps array with another layout
    array[:] = values.astype(array.dtype)
    assert open_shard_files(maps) is None
    store.commit_shard(0, _ledger(S))
    reader = SaliencyStore.open(tmp_path, "fp")
    for i in range(S):
        assert np.array_equal(reader.read(f"{i:064x}")[0], values[i].astype(array.dtype), equal_nan=True)


def test_index_at_the_start_is_refused(tmp_path: Path) -> None:
    from zarr.codecs import ShardingCodec

    codec = ShardingCodec(chunk_shape=(1, *SHAPE), codecs=[BytesCodec(), ZstdCodec()],
                          index_location=ShardingCodecIndexLocation.start)
    zarr.create_array(tmp_path / "maps", shape=(S, *SHAPE), chunks=(S, *SHAPE), dtype="float32",
                      serializer=codec, compressors=None, fill_value=0.0)
    assert open_shard_files(tmp_path / "maps") is None


def test_a_damaged_shard_index_is_a_clear_error(tmp_path: Path) -> None:
    array = _array(tmp_path / "maps", n_shards=1)
    array[:] = _values(4)
    path = tmp_path / "maps" / "c" / "0" / "0" / "0"
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF  # a flipped bit in the index
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="shard index checksum mismatch"):
        open_shard_files(tmp_path / "maps").read_row(0, 3)


def _ledger(n: int):
    import pyarrow as pa

    from storage.saliency_store import LEDGER_SCHEMA

    return pa.table({"shard": [0] * n, "row": list(range(n)), "sha256": [f"{i:064x}" for i in range(n)],
                     "source": ["x"] * n, "reason": [None] * n, "detail": [None] * n}, schema=LEDGER_SCHEMA)
