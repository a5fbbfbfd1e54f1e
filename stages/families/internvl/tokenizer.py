"""The demo tokenizer: a small byte-level BPE trained on a dataset's comments.

Wrapped as a transformers ``PreTrainedTokenizerFast`` with InternVL's image tokens
(``<img>``, ``</img>``, ``<IMG_CONTEXT>``), ChatML turn tokens and a ChatML chat template,
so the rest of stage 2 treats it exactly like a real InternVL ``-hf`` tokenizer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from stages.families.text import IM_END, IM_START, PAD, bpe_tokenizer

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT]

# ChatML, as used by InternVL2.5/3 (Qwen2 LLM); the end-of-turn token is the eos.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_bpe(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """The demo's byte-level BPE with InternVL's image tokens and ChatML chat template."""
    return bpe_tokenizer(texts, SPECIAL_TOKENS, CHAT_TEMPLATE, vocab_size, min_frequency)


def load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """A tokenizer saved by ``Family.dataset_tokenizer`` or shipped with a base model."""
    tok = AutoTokenizer.from_pretrained(str(directory))
    missing = [t for t in (IMG_START, IMG_END, IMG_CONTEXT) if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:
        raise ValueError(f"{directory}: tokenizer lacks InternVL image tokens {missing}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
