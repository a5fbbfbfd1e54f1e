"""The generation loop every family shares: a loaded run as a captioner, (image, saliency map) -> critique.

Prompts are left-padded so every sequence ends at the same position and ``model.generate`` (KV cache)
appends to all of them at once; image features are computed once per batch by the family's
:meth:`Captioner.image_inputs` and handed to ``generate`` as ``mm_encoder_outputs``, which transformers
expands correctly for beam search. Sampling is reseeded per batch; each critique is cut after its eos.
A family subclasses :class:`Captioner` with three hooks: ``image_cost``, ``prepare`` and ``image_inputs``.
The same inputs score given continuations by teacher forcing (:meth:`Captioner.continuation_logprobs`: the
report's forced choices).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from stages.families.text import IGNORE


@dataclass(frozen=True)
class DecodeConfig:
    """How critiques are decoded: greedy by default, beam search or nucleus sampling on request."""

    max_new_tokens: int = 64
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0  # sampling only: reseeded per batch
    no_repeat_ngram_size: int = 0  # > 0: an n-gram of this size never repeats within a critique

    def tag(self) -> str:
        """'' for the default (greedy), else a short stable name for the predictions directory."""
        if self == DecodeConfig():
            return ""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]

    def generate_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=self.do_sample)
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p)
        if self.no_repeat_ngram_size:
            kw.update(no_repeat_ngram_size=self.no_repeat_ngram_size)
        return kw


def default_device() -> torch.device:
    """cuda:<LOCAL_RANK> when a GPU is present (one per torchrun rank), else CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}")
    return torch.device("cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    """Generation's dtype on ``device``: bf16 on GPUs that support it, else fp32."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


class Captioner:
    """A loaded ASE-MLLM + tokenizer + the family's image spec: (image, saliency map) -> critique, in batches.
    A prompt (the family's) carries at least ``input_ids`` (list of ints)."""

    def __init__(self, model: Any, tokenizer: Any, spec: Any, device: torch.device | None = None) -> None:
        self.device = device or default_device()
        # a model loaded by report's load_run is already there in this dtype (no copy); another one is moved and cast
        self.model = model.to(self.device, dtype=compute_dtype(self.device)).eval().requires_grad_(False)
        self.tokenizer, self.spec = tokenizer, spec
        self.needs_saliency = getattr(model.config, "ias_fusion", "none") == "cross_attention"

    # ---- hooks
    def image_cost(self, width: int, height: int) -> int:
        """Prompt-length key for batching (images of similar cost share a batch)."""
        raise NotImplementedError

    def prepare(self, img: Image.Image, saliency_map: np.ndarray | None, prompt: str | None = None) -> Any:
        """One image and its raw map (None: uniform) as the family's prompt, asking the aesthetic question or
        ``prompt``."""
        raise NotImplementedError

    def image_inputs(self, prompts: list[Any], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
        """The batch's image features and whatever else the family's ``generate`` takes beside the tokens."""
        raise NotImplementedError

    # ---- the loop
    def left_padded(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both [B, L]: every sequence ends at column L-1."""
        n, length = len(sequences), max(len(ids) for ids in sequences)
        input_ids = torch.full((n, length), self.tokenizer.pad_token_id, dtype=torch.long)  # [B, L]
        attention_mask = torch.zeros((n, length), dtype=torch.long)  # [B, L]
        for i, ids in enumerate(sequences):
            input_ids[i, length - len(ids):] = torch.as_tensor(ids)
            attention_mask[i, length - len(ids):] = 1
        return input_ids, attention_mask

    def generate(self, prompts: list[Any], decode: DecodeConfig = DecodeConfig()) -> list[str]:
        """Critiques of a batch of prompts (left-padded, one ``generate`` call)."""
        texts = self.tokenizer.batch_decode(self.generate_ids(prompts, decode), skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]

    @torch.inference_mode()
    def generate_ids(self, prompts: list[Any], decode: DecodeConfig = DecodeConfig()) -> list[list[int]]:
        """New token ids per prompt, up to and including eos (padding after it removed)."""
        input_ids, attention_mask = self.left_padded([p.input_ids for p in prompts])  # [B, L] each
        length = input_ids.shape[1]
        inputs = self.image_inputs(prompts, input_ids, attention_mask)
        if decode.do_sample:
            torch.manual_seed(decode.seed)
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            **inputs,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **decode.generate_kwargs(),
        )  # [B, L + new]
        eos = self.tokenizer.eos_token_id
        return [row[: row.index(eos) + 1] if eos in row else row for row in out[:, length:].tolist()]

    @torch.inference_mode()
    def continuation_logprobs(self, prompt: Any, continuations: list[list[int]]) -> torch.Tensor:
        """Mean log-likelihood per token of each continuation (token ids) right after ``prompt``, given its image
        and map: [K] float32. The prompt (image features and all) runs once; the continuations then run as one
        right-padded batch on its key/value cache (positions, 3-D rope included, continue from the prompt's)."""
        ids, mask = self.left_padded([list(prompt.input_ids)])  # [1, P]
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=True,
                         **self.image_inputs([prompt], ids, mask))
        first = out.logits[0, -1].float().log_softmax(-1)  # [V]: the first token of every continuation
        k, length = len(continuations), max(len(c) for c in continuations)
        cache = out.cache
        cache.batch_repeat_interleave(k)
        tokens = torch.full((k, length), self.tokenizer.pad_token_id, dtype=torch.long)  # [K, C], right padded
        for i, c in enumerate(continuations):
            tokens[i, :len(c)] = torch.as_tensor(c)
        # no attention mask: the prompt is unpadded and right padding only follows a continuation's own tokens
        logits = self.model(input_ids=tokens.to(self.device), cache=cache).logits  # [K, C, V]
        following = tokens[:, 1:, None].to(self.device)  # [K, C-1, 1]: each position's next token
        logp = logits[:, :-1].float().log_softmax(-1).gather(-1, following)[..., 0]  # [K, C-1]
        logp = torch.cat([first[tokens[:, 0].to(self.device)][:, None], logp], dim=1).cpu()  # [K, C]
        lengths = torch.tensor([len(c) for c in continuations])  # [K]
        real = torch.arange(length)[None] < lengths[:, None]  # [K, C]
        return (logp * real).sum(1) / lengths
