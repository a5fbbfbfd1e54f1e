"""Chat-formatted token sequences for training and generation.

The user turn is ``<image>\\n`` + the paper's prompt, rendered with the tokenizer's own chat
template; the ``<image>`` placeholder becomes ``<img>`` + ``<IMG_CONTEXT>`` x (tokens per tile x
tiles) + ``</img>`` (InternVL's layout). Labels are -100 everywhere except the critique and the
end-of-turn (eos) token that closes it.
"""
from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from stages.families.internvl.tokenizer import IMG_CONTEXT, IMG_END, IMG_START
from stages.families.text import PROMPT, Encoded, encode_after, token_ids

_PLACEHOLDER = "<image>"


def image_token_ids(tokenizer: PreTrainedTokenizerBase, n_context: int) -> list[int]:
    """``<img>`` + ``<IMG_CONTEXT>`` x n_context + ``</img>``."""
    start, ctx, end = tokenizer.convert_tokens_to_ids([IMG_START, IMG_CONTEXT, IMG_END])
    return [start] + [ctx] * n_context + [end]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, n_context: int, prompt: str = PROMPT) -> list[int]:
    """Token ids of the full generation-time prompt, ending with the assistant header."""
    messages = [{"role": "user", "content": f"{_PLACEHOLDER}\n{prompt}"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before, after = text.split(_PLACEHOLDER, 1)
    return token_ids(tokenizer, before) + image_token_ids(tokenizer, n_context) + token_ids(tokenizer, after)


def encode_example(
    tokenizer: PreTrainedTokenizerBase, n_context: int, critique: str, max_length: int | None = None,
    prompt: str = PROMPT,
) -> Encoded:
    """Prompt + critique + eos; loss only on the critique and eos.

    ``max_length`` truncates the critique (never the image tokens); the eos is always kept.
    """
    return encode_after(tokenizer, prompt_ids(tokenizer, n_context, prompt), critique, max_length)
