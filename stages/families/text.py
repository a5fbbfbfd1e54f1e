"""What the families' text sides share: the paper's prompt, loss masking, the demo BPE and ChatML turn tokens.

A family renders the prompt with its own chat template and image tokens; from the prompt's ids on, an
example is the same in every family: critique + eos, with labels on those only.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PROMPT = "Comment on this image from an aesthetic perspective."
IGNORE = -100  # label of positions without loss
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # ChatML turns; the end of a turn is the eos
PAD = "<|endoftext|>"


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]


def token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def encode_after(tokenizer: PreTrainedTokenizerBase, head: list[int], critique: str,
                 max_length: int | None = None) -> Encoded:
    """``head`` (a prompt's ids, any base family) + critique + eos, labels on the critique and eos only."""
    target = token_ids(tokenizer, critique.strip())
    if max_length is not None:
        room = max_length - len(head) - 1
        if room < 1:
            raise ValueError(f"max_length {max_length} leaves no room for the critique after {len(head)} prompt tokens")
        target = target[:room]
    target = target + [tokenizer.eos_token_id]
    return Encoded(input_ids=head + target, labels=[IGNORE] * len(head) + target)


def bpe_tokenizer(
    texts: Iterable[str], special_tokens: list[str], chat_template: str, vocab_size: int = 2048, min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it with a family's special tokens (ids 0.., pad first) and
    chat template; the end-of-turn token is the eos."""
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
