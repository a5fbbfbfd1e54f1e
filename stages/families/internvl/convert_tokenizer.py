"""The tokenizer of an original InternVL2 checkpoint, made loadable without remote code.

InternLM2's tokenizer is a sentencepiece BPE model behind remote code (``tokenization_internlm2.py``). Its slow
class splits the text on added tokens, encodes each remaining piece with ``sp_model.encode`` (so the dummy
prefix ``▁`` starts every piece) and prepends ``<s>``. That is rebuilt here as a plain ``tokenizers`` BPE
(merges ranked by piece score, byte fallback, the dummy prefix as a normaliser), with the checkpoint's added
tokens at their ids; a ``tokenizer.json`` needs nothing but transformers to load. Tokenizers of the Qwen2 /
Llama variants are native classes already and are only re-saved.

Both get InternVL's own chat template (``conversation.py`` in OpenGVLab/InternVL: the ``MPT`` separator
style, a default system message), and ``<|im_end|>``, the end of a turn, as their eos: the official
``chat()`` stops on it, and stage 2 ends every critique with the eos.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import generate_merges

from pipeline.errors import PipelineError
from stages.families.internvl.tokenizer import IMG_CONTEXT, IMG_END, IMG_START

_INTERNVL2_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
# InternVL conversation templates -> (turn separator, default system message); all are
# "<|im_start|>system\n{system}" + sep, then "<|im_start|>{role}\n{content}" + sep per turn
CHAT_TEMPLATES: dict[str, tuple[str, str]] = {
    "internlm2-chat": ("<|im_end|>", _INTERNVL2_SYSTEM),
    "Hermes-2": ("<|im_end|>", _INTERNVL2_SYSTEM),
    "internvl2_5": ("<|im_end|>\n", "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"),
}
INTERNLM2_CLASSES = ("InternLM2Tokenizer", "InternLM2TokenizerFast")
_SP_NORMAL, _SP_USER_DEFINED, _SP_BPE = 1, 4, 2  # sentencepiece_model.proto enums


class TokenizerConversionError(PipelineError, ValueError):
    """A tokenizer this converter cannot reproduce exactly."""


def _jinja(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid Jinja string literal


def chat_template(template: str, system_message: str | None = None, bos_token: str | None = None) -> str:
    """InternVL's conversation template as a Jinja chat template (a leading system message replaces the default)."""
    if template not in CHAT_TEMPLATES:
        raise TokenizerConversionError(
            f"chat template {template!r} is not supported (known: {', '.join(CHAT_TEMPLATES)})")
    sep, default_system = CHAT_TEMPLATES[template]
    system = default_system if system_message is None else system_message
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        f"{{%- else -%}}{{%- set system = {_jinja(system)} -%}}{{%- set turns = messages -%}}{{%- endif -%}}"
        + ("{{ bos_token }}" if bos_token else "")
        + f"{{{{ '<|im_start|>system\\n' + system + {_jinja(sep)} }}}}"
        "{%- for message in turns -%}"
        f"{{{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + {_jinja(sep)} }}}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


def _content(token: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or a serialised AddedToken."""
    return token.get("content") if isinstance(token, dict) else token


def tokenizer_class(config: dict[str, Any]) -> str:
    """The class a tokenizer_config.json asks for (``auto_map`` names remote code)."""
    remote = (config.get("auto_map") or {}).get("AutoTokenizer") or [None]
    name = config.get("tokenizer_class") or (remote[0] or "").rsplit(".", 1)[-1]
    return name or "unknown"


def sentencepiece_bpe(model_file: Path, added: dict[int, AddedToken]) -> Tokenizer:
    """A ``tokenizers`` BPE that encodes like ``sp_model.encode`` on each text piece. ``added``: id -> token;
    they replace the sentencepiece piece at their id (InternLM2 names ``<|im_start|>`` ``[UNUSED_TOKEN_146]``
    in the sentencepiece model)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    spec = proto.normalizer_spec
    if proto.trainer_spec.model_type != _SP_BPE:
        raise TokenizerConversionError(f"{model_file}: not a sentencepiece BPE model (InternLM2 tokenizers are BPE)")
    if spec.precompiled_charsmap or spec.remove_extra_whitespaces:
        raise TokenizerConversionError(
            f"{model_file}: sentencepiece normalisation '{spec.name}' (remove_extra_whitespaces="
            f"{spec.remove_extra_whitespaces}) cannot be reproduced exactly; only identity normalisation is supported")
    normal = {p.piece: p.score for p in proto.pieces if p.type == _SP_NORMAL}
    merges = generate_merges({piece: i for i, piece in enumerate(normal)}, vocab_scores=normal)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    pieces = {i: p.piece for i, p in enumerate(proto.pieces)}
    for i, token in added.items():
        vocab.pop(pieces.get(i), None)
        vocab[token.content] = i
    unk = proto.trainer_spec.unk_piece or "<unk>"
    tok = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=proto.trainer_spec.byte_fallback))
    dummy_prefix = spec.add_dummy_prefix
    tok.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("▁")] if dummy_prefix else []) + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if dummy_prefix else []))
    tok.add_tokens([AddedToken(p.piece, normalized=True, special=False)
                    for p in proto.pieces if p.type == _SP_USER_DEFINED])
    tok.add_special_tokens([t for _, t in sorted(added.items()) if t.special])
    tok.add_tokens([t for _, t in sorted(added.items()) if not t.special])
    wrong = {t.content: (i, tok.token_to_id(t.content)) for i, t in added.items() if tok.token_to_id(t.content) != i}
    if wrong:
        raise TokenizerConversionError(f"{model_file}: added tokens did not keep their ids (token: (id, got)): {wrong}")
    return tok


def internlm2_tokenizer(src: Path, config: dict[str, Any]) -> PreTrainedTokenizerFast:
    """InternLM2Tokenizer (slow, remote code) as a plain fast tokenizer with the same ids."""
    model_file = src / config.get("vocab_file", "tokenizer.model")
    if not model_file.exists():
        raise TokenizerConversionError(f"{src}: InternLM2 tokenizer without its sentencepiece model {model_file.name}")
    added = {int(i): AddedToken(**{k: v for k, v in spec.items() if k in ("content", "single_word", "lstrip", "rstrip",
                                                                          "normalized", "special")})
             for i, spec in (config.get("added_tokens_decoder") or {}).items()}
    tok = sentencepiece_bpe(model_file, added)
    special = {name: _content(config.get(name, default)) for name, default in
               (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"), ("pad_token", "</s>"))}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, **special,
        add_bos_token=config.get("add_bos_token", True), add_eos_token=config.get("add_eos_token", False),
        clean_up_tokenization_spaces=False, model_max_length=config.get("model_max_length", 8192),
    )


def convert_tokenizer(src: Path, template: str, system_message: str | None = None) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, loadable without remote code, with InternVL's chat template and eos."""
    src = Path(src)
    path = src / "tokenizer_config.json"
    if not path.exists():
        raise TokenizerConversionError(f"{src}: no tokenizer_config.json (the checkpoint's tokenizer files are needed)")
    config = json.loads(path.read_text(encoding="utf-8"))
    name = tokenizer_class(config)
    if name in INTERNLM2_CLASSES:
        tok = internlm2_tokenizer(src, config)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(str(src), trust_remote_code=False)
        except (ValueError, OSError, ImportError) as e:
            raise TokenizerConversionError(
                f"{src}: tokenizer class {name} cannot be loaded without remote code ({e})") from None
    bos = tok.bos_token if getattr(tok, "add_bos_token", False) else None  # InternLM2 adds <s>, Qwen2 nothing
    tok.chat_template = chat_template(template, system_message, bos)
    sep, _ = CHAT_TEMPLATES[template]
    tok.eos_token = sep.strip()
    missing = [t for t in (IMG_START, IMG_END, IMG_CONTEXT, sep.strip()) if t not in tok.get_vocab()]
    if missing:
        raise TokenizerConversionError(f"{src}: tokenizer lacks InternVL tokens {missing}")
    return tok
