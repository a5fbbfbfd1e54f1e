"""What the families' data paths share: the (image, comment) pairs of a split, the dataset constructor (store,
missing maps, a sequence length taken from the data) and the collators' token padding.

A family's dataset subclasses :class:`CritiqueData` and says how an image becomes model inputs: its
prompt, its image tokens and ``__getitem__``. Map-style, so the HF Trainer's seeded sampler gives a
deterministic shuffle and, under torchrun, accelerate's sharded sampler gives every rank a disjoint share.
"""
from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from pipeline.errors import PipelineError
from stages.families.text import IGNORE
from storage.images import ImageError
from storage.tables import image_root, read_table


class MissingSaliencyError(PipelineError):
    """Images to train on or to caption have no saliency map (no store, or no row in it)."""


class SequenceLengthError(PipelineError):
    """``max_length`` cannot hold an image's tokens and the prompt."""


def pairs(dataset: str, split: str) -> tuple[pa.Table, pa.Table]:
    """Images of ``split`` and their comments, sorted by (image_id, comment_id)."""
    images = read_table(dataset, "images")
    images = images.filter(pc.equal(images["split"], split))
    comments = read_table(dataset, "comments")
    comments = comments.filter(pc.is_in(comments["image_id"], value_set=images["image_id"]))
    comments = comments.filter(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(comments["text"])), 0))
    comments = comments.sort_by([("image_id", "ascending"), ("comment_id", "ascending")])
    return images, comments


class CritiqueData(Dataset):
    """``(image, comment)`` pairs of one split, one example each.

    ``store`` is a saliency source (``read(sha256) -> (map, category, score)``, ``has(sha256)``) or None.
    Images without a map raise :class:`MissingSaliencyError` naming the saliency stage, or, with
    ``allow_missing_saliency``, get a uniform map; ``missing_saliency`` counts them.

    Sequence length comes from the data: every example's length (prompt + its image's tokens + critique +
    eos) is known up front, ``max_length`` is the longest, or the ``max_length`` given as a cap, in which
    case longer critiques are cut and counted in ``truncated``; a cap that cannot hold some image's tokens
    fails here, before training.
    """

    image_limit_option = ""  # the CLI option that makes images smaller (named when max_length cannot hold one)

    def __init__(
        self,
        dataset: str,
        split: str,
        tokenizer: PreTrainedTokenizerBase,
        spec: Any,
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
        self.tokenizer, self.spec, self.store = tokenizer, spec, store
        self.root = image_root(dataset)
        rows = {iid: i for i, iid in enumerate(images["image_id"].to_pylist())}
        paths, shas = images["path"].to_pylist(), images["sha256"].to_pylist()
        image_ids = comments["image_id"].to_pylist()
        self.items = [  # (image path, sha256, text)
            (paths[rows[iid]], shas[rows[iid]], text) for iid, text in zip(image_ids, comments["text"].to_pylist())
        ]
        widths, heights = images["width"].to_pylist(), images["height"].to_pylist()
        try:
            tokens = {iid: self.image_tokens(widths[i], heights[i]) for iid, i in rows.items()}
        except ImageError as e:
            raise SequenceLengthError(f"dataset '{dataset}' split '{split}': {e.detail}") from None
        self.max_length, self.truncated = self._sequence_length([tokens[iid] for iid in image_ids], max_length)
        used = sorted({sha for _, sha, _ in self.items})
        self.missing = {sha for sha in used if store is None or not store.has(sha)}
        self.missing_saliency = len(self.missing)  # images (not pairs) given a uniform map
        if self.missing and not allow_missing_saliency:
            raise MissingSaliencyError(
                f"{len(self.missing)} of {len(used)} '{split}' images of dataset '{dataset}' have no saliency map "
                f"(e.g. sha256 {min(self.missing)[:12]}): run the saliency stage first (`ase-mllm saliency "
                f"--dataset {dataset}`), or pass --allow-missing-saliency to use a uniform map for them"
            )

    # ---- hooks
    def prompt_ids(self, n_image_tokens: int) -> list[int]:
        """The family's generation-time prompt holding ``n_image_tokens`` image tokens."""
        raise NotImplementedError

    def image_tokens(self, width: int, height: int) -> int:
        """LLM image tokens of an image of this size (an ImageError for one the family refuses)."""
        raise NotImplementedError

    def describe_image_tokens(self, n: int) -> str:
        """``n`` image tokens in the family's words (for the error when max_length cannot hold them)."""
        return f"{n} image tokens"

    # ---- shared
    def __len__(self) -> int:
        return len(self.items)

    def _sequence_length(self, image_tokens: list[int], cap: int | None, chunk: int = 8192) -> tuple[int, int]:
        """(max_length, critiques that must be truncated) from every example's exact token count."""
        prompt = len(self.prompt_ids(0))  # the chat prompt around the image's tokens
        heads = [prompt + n for n in image_tokens]
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
            raise SequenceLengthError(
                f"max_length {cap} cannot hold the largest image of '{self.dataset}' split '{self.split}': "
                f"{self.describe_image_tokens(longest_head - prompt)} + {prompt} prompt tokens = {longest_head}, plus "
                f"at least one critique token and eos; raise --max-length to at least {longest_head + 2} or lower "
                f"{self.image_limit_option}")
        self.text_tokens = min(self.text_tokens, cap - longest_head)
        return min(cap, max(needed)), sum(n > cap for n in needed)

    def saliency_map(self, sha: str) -> torch.Tensor | None:
        """The image's raw stored map [h, w] float32; None (the uniform map) when it has none."""
        if sha in self.missing:
            return None
        sal, _category, _score = self.store.read(sha)  # [h, w], this row only
        return torch.from_numpy(sal)


def pad_tokens(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and labels of a batch, right-padded to its longest example."""
    length = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, length), pad_token_id, dtype=torch.long)  # [B, L]
    labels = torch.full((n, length), IGNORE, dtype=torch.long)  # [B, L]
    attention_mask = torch.zeros((n, length), dtype=torch.long)  # [B, L]
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        input_ids[i, :k] = torch.as_tensor(e["input_ids"])
        labels[i, :k] = torch.as_tensor(e["labels"])
        attention_mask[i, :k] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def sample_ids(examples: list[dict[str, Any]]) -> list[int]:
    """The examples' ``sample_id`` as a host list (the trainer logs and drops them without touching the device)."""
    return [int(e["sample_id"]) for e in examples]
