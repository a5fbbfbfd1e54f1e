"""The demo tokenizer: a small byte-level BPE trained on a dataset's comments.

Wrapped as a transformers ``PreTrainedTokenizerFast`` with InternVL's image tokens
(``<img>``, ``</img>``, ``<IMG_CONTEXT>``), ChatML turn tokens and a ChatML chat template,
so the rest of stage 2 treats it exactly like a real InternVL ``-hf`` tokenizer.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
PAD = "<|endoftext|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT]

# ChatML, as used by InternVL2.5/3 (Qwen2 LLM); the end-of-turn token is the eos.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_bpe(
    texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2,
    special_tokens: list[str] = SPECIAL_TOKENS, chat_template: str = CHAT_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it with the special tokens (ids 0.., pad first) and chat
    template (InternVL's by default; the Qwen2.5-VL family passes its own, qwen/data.py)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,  # ids 0.., fixed
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD,
        eos_token=IM_END,
        unk_token=None,
        additional_special_tokens=[t for t in special_tokens if t not in (PAD, IM_END)],
        chat_template=chat_template,
        model_max_length=4096,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """Write the tokenizer into ``directory`` (HF format) via a temp dir + rename."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(str(tmp))
    tmp.replace(directory)


def load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved by :func:`save_tokenizer` or shipped with a base model."""
    tok = AutoTokenizer.from_pretrained(str(directory))
    missing = [t for t in (IMG_START, IMG_END, IMG_CONTEXT) if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:
        raise ValueError(f"{directory}: tokenizer lacks InternVL image tokens {missing}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def dataset_tokenizer(texts: Iterable[str], directory: Path, vocab_size: int = 2048) -> PreTrainedTokenizerBase:
    """Load the tokenizer in ``directory`` or train one on ``texts`` and save it there."""
    directory = Path(directory)
    if not (directory / "tokenizer.json").exists():
        save_tokenizer(train_bpe(texts, vocab_size=vocab_size), directory)
    return load_tokenizer(directory)
