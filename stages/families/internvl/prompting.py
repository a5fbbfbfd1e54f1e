"""Chat-formatted token sequences for training and generation.

The user turn is ``<image>\\n`` + the paper's prompt, rendered with the tokenizer's own chat
template; the ``<image>`` placeholder becomes ``<img>`` + ``<IMG_CONTEXT>`` x (tokens per tile x
tiles) + ``</img>`` (InternVL's layout). Labels are -100 everywhere except the critique and the
end-of-turn (eos) token that closes it.
"""
from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from stages.families.internvl.tokenizer import IMG_CONTEXT, IMG_END, IMG_START

PROMPT = "Comment on this image from an aesthetic perspective."
IGNORE = -100
_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]


def image_token_ids(tokenizer: PreTrainedTokenizerBase, n_context: int) -> list[int]:
    """``<img>`` + ``<IMG_CONTEXT>`` x n_context + ``</img>``."""
    start, ctx, end = tokenizer.convert_tokens_to_ids([IMG_START, IMG_CONTEXT, IMG_END])
    return [start] + [ctx] * n_context + [end]


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def prompt_ids(tokenizer: PreTrainedTokenizerBase, n_context: int, prompt: str = PROMPT) -> list[int]:
    """Token ids of the full generation-time prompt, ending with the assistant header."""
    messages = [{"role": "user", "content": f"{_PLACEHOLDER}\n{prompt}"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before, after = text.split(_PLACEHOLDER, 1)
    return _ids(tokenizer, before) + image_token_ids(tokenizer, n_context) + _ids(tokenizer, after)


def encode_example(
    tokenizer: PreTrainedTokenizerBase, n_context: int, critique: str, max_length: int | None = None,
    prompt: str = PROMPT,
) -> Encoded:
    """Prompt + critique + eos; loss only on the critique and eos.

    ``max_length`` truncates the critique (never the image tokens); the eos is always kept.
    """
    return encode_after(tokenizer, prompt_ids(tokenizer, n_context, prompt), critique, max_length)


def encode_after(tokenizer: PreTrainedTokenizerBase, head: list[int], critique: str,
                 max_length: int | None = None) -> Encoded:
    """``head`` (a prompt's ids, any base family) + critique + eos, labels on the critique and eos only."""
    target = _ids(tokenizer, critique.strip())
    if max_length is not None:
        room = max_length - len(head) - 1
        if room < 1:
            raise ValueError(f"max_length {max_length} leaves no room for the critique after {len(head)} prompt tokens")
        target = target[:room]
    target = target + [tokenizer.eos_token_id]
    return Encoded(input_ids=head + target, labels=[IGNORE] * len(head) + target)
