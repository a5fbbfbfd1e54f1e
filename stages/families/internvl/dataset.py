"""The stage-2 training stream: one example per (image, reference comment) pair.

Map-style, so the HF Trainer's seeded sampler gives a deterministic shuffle and, under
torchrun, accelerate's sharded sampler gives every rank a disjoint share. Each item opens its
image, tiles it, reads that image's raw saliency map from the store by sha256 (one row, never the
whole store; the model cuts it into saliency tiles on its device), and tokenises the chat-formatted
example.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from pipeline.errors import PipelineError
from stages.families.internvl.prompting import encode_example, prompt_ids
from stages.families.internvl.tiling import plan_tiles, tile_image
from storage.images import open_rgb, safe_join
from storage.tables import image_root, read_table


class MissingSaliencyError(PipelineError):
    """Images of the training split have no saliency map in the store."""


class SequenceLengthError(PipelineError):
    """``max_length`` cannot hold an image's tokens and the prompt."""


@dataclass(frozen=True)
class TileSpec:
    tile_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    tokens_per_tile: int = 256  # (tile_size / patch)^2 * downsample_ratio^2


def pairs(dataset: str, split: str) -> tuple[pa.Table, pa.Table]:
    """Images of ``split`` and their comments, sorted by (image_id, comment_id)."""
    images = read_table(dataset, "images")
    images = images.filter(pc.equal(images["split"], split))
    comments = read_table(dataset, "comments")
    comments = comments.filter(pc.is_in(comments["image_id"], value_set=images["image_id"]))
    comments = comments.filter(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(comments["text"])), 0))
    comments = comments.sort_by([("image_id", "ascending"), ("comment_id", "ascending")])
    return images, comments


class CritiqueDataset(Dataset):
    """``(image, comment)`` pairs of one split -> tiles, raw saliency map + tile grid, and tokens.

    ``store`` is a SaliencyStore (``read(sha256) -> (map, category, score)``, ``has(sha256)``) or
    None. Images without a map raise :class:`MissingSaliencyError` naming the saliency stage, or,
    with ``allow_missing_saliency``, get a uniform map; ``missing_saliency`` counts them.

    Sequence length comes from the data: every example's length (prompt + its image's tiles x
    tokens per tile + critique + eos) is known up front, ``max_length`` is the longest, or the
    ``max_length`` given as a cap, in which case longer critiques are cut and counted in
    ``truncated``; a cap that cannot hold some image's tokens fails here, before training.
    """

    def __init__(
        self,
        dataset: str,
        split: str,
        tokenizer: PreTrainedTokenizerBase,
        tiles: TileSpec,
        store: Any | None,
        allow_missing_saliency: bool = False,
        max_length: int | None = None,
        limit: int | None = None,
    ) -> None:
        images, comments = pairs(dataset, split)
        if limit is not None:
            comments = comments.slice(0, limit)
        if comments.num_rows == 0:
            raise ValueError(f"dataset '{dataset}' has no comments in split '{split}': nothing to train on")
        self.dataset, self.split = dataset, split
        self.tokenizer, self.tiles, self.store = tokenizer, tiles, store
        self.root = image_root(dataset)
        rows = {iid: i for i, iid in enumerate(images["image_id"].to_pylist())}
        paths, shas = images["path"].to_pylist(), images["sha256"].to_pylist()
        image_ids = comments["image_id"].to_pylist()
        self.items = [  # (image path, sha256, text)
            (paths[rows[iid]], shas[rows[iid]], text) for iid, text in zip(image_ids, comments["text"].to_pylist())
        ]
        widths, heights = images["width"].to_pylist(), images["height"].to_pylist()
        tiles_of = {iid: plan_tiles(widths[i], heights[i], tiles.tile_size, tiles.min_tiles, tiles.max_tiles,
                                    tiles.use_thumbnail).num_tiles for iid, i in rows.items()}
        self.max_length, self.truncated = self._sequence_length([tiles_of[iid] for iid in image_ids], max_length)
        used = sorted({sha for _, sha, _ in self.items})
        self.missing = {sha for sha in used if store is None or not store.has(sha)}
        self.missing_saliency = len(self.missing)  # images (not pairs) given a uniform map
        if self.missing and not allow_missing_saliency:
            raise MissingSaliencyError(
                f"{len(self.missing)} of {len(used)} '{split}' images of dataset '{dataset}' have no saliency map "
                f"(e.g. sha256 {min(self.missing)[:12]}): run the saliency stage first (`ase-mllm saliency "
                f"--dataset {dataset}`), or pass --allow-missing-saliency to use a uniform map for them"
            )

    def __len__(self) -> int:
        return len(self.items)

    def _sequence_length(self, n_tiles: list[int], cap: int | None, chunk: int = 8192) -> tuple[int, int]:
        """(max_length, critiques that must be truncated) from every example's exact token count."""
        prompt = len(prompt_ids(self.tokenizer, 0))  # the chat prompt around the image's context tokens
        heads = [prompt + n * self.tiles.tokens_per_tile for n in n_tiles]
        texts = [text.strip() for _, _, text in self.items]
        critiques: list[int] = []
        for i in range(0, len(texts), chunk):
            critiques += [len(ids) for ids in self.tokenizer(texts[i:i + chunk], add_special_tokens=False)["input_ids"]]
        needed = [head + n + 1 for head, n in zip(heads, critiques)]  # + eos
        self.text_tokens = prompt + max(critiques) + 1  # longest prompt + critique + eos
        if cap is None:
            return max(needed), 0
        longest_head = max(heads)
        if cap < longest_head + 2:
            t = n_tiles[heads.index(longest_head)]
            raise SequenceLengthError(
                f"max_length {cap} cannot hold the largest image of '{self.dataset}' split '{self.split}': {t} tiles x "
                f"{self.tiles.tokens_per_tile} tokens + {prompt} prompt tokens = {longest_head}, plus at least one "
                f"critique token and eos; raise --max-length to at least {longest_head + 2} or lower --max-tiles")
        self.text_tokens = min(self.text_tokens, cap - longest_head)
        return min(cap, max(needed)), sum(n > cap for n in needed)

    def saliency_map(self, sha: str) -> torch.Tensor | None:
        """The image's raw stored map [h, w] float32; None (the uniform map) when it has none."""
        if sha in self.missing:
            return None
        sal, _category, _score = self.store.read(sha)  # [h, w], this row only
        return torch.from_numpy(sal)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, sha, text = self.items[index]
        img = open_rgb(safe_join(self.root, path))
        t = self.tiles
        tiling = plan_tiles(img.width, img.height, t.tile_size, t.min_tiles, t.max_tiles, t.use_thumbnail)
        pixel_values = tile_image(img, tiling, t.tile_size)  # [T, 3, S, S]
        n_tiles = pixel_values.shape[0]
        enc = encode_example(self.tokenizer, t.tokens_per_tile * n_tiles, text, self.max_length)
        return {
            "sample_id": index,
            "input_ids": enc.input_ids,
            "labels": enc.labels,
            "pixel_values": pixel_values,
            "saliency_map": self.saliency_map(sha),  # [h, w] or None
            "tile_grid": tiling.tile_grid,  # (cols, rows, thumbnail)
        }

