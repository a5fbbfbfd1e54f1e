"""``ase-mllm convert-base``: an original OpenGVLab InternVL2 / InternVL2.5 checkpoint -> a native transformers
``InternVLForConditionalGeneration`` directory, read from its files without the checkpoint's remote code.

Weights stream tensor by tensor from the source safetensors into new shards (peak memory: about one tensor on
top of the process), renamed, and split where the original fuses them:

  InternViT   vision_model.embeddings.{class_embedding, position_embedding, patch_embedding}
                 -> model.vision_tower.embeddings.{cls_token, position_embeddings, patch_embeddings.projection}
              vision_model.encoder.layers.N.{norm1, norm2, ls1, ls2, attn.proj, attn.q_norm, attn.k_norm, mlp}
                 -> model.vision_tower.encoder.layer.N.{layernorm_before, layernorm_after, lambda_1, lambda_2,
                    attention.projection_layer, attention.q_norm, attention.k_norm, mlp}
              attn.qkv -> attention.{q,k,v}_proj (consecutive thirds)
  projector   mlp1.{0, 1, 3} -> model.multi_modal_projector.{layer_norm, linear_1, linear_2} (2 is the GELU)
  InternLM2   language_model.model.{tok_embeddings, norm} -> model.language_model.{embed_tokens, norm}
  (-> Llama)  layers.N.{attention_norm, ffn_norm, attention.wo, feed_forward.w1, w3, w2}
                 -> layers.N.{input_layernorm, post_attention_layernorm, self_attn.o_proj, mlp.gate_proj, up_proj,
                    down_proj}
              attention.wqkv -> self_attn.{q,k,v}_proj, unpacked per KV head (see ``split_wqkv``)
              language_model.output -> lm_head
  Qwen2/Llama language_model.model. -> model.language_model.; language_model.lm_head -> lm_head

The output is written to a temp dir beside OUT_DIR and renamed into place, so a killed conversion leaves no
half-written model; ``conversion.json`` records the source files, and a rerun on an unchanged source is a no-op.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import safe_open
from transformers import GenerationConfig, LlamaConfig, PreTrainedConfig, Qwen2Config
from transformers.models.internvl.configuration_internvl import InternVLConfig, InternVLVisionConfig

from pipeline.errors import PipelineError
from stages.families.internvl.tokenizer import IMG_CONTEXT
from storage.safetensors_stream import DTYPES, TensorSpec, plan_shards, shard_file_names, write_index, write_shard

CONVERTER_VERSION = 1
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
INTERNLM2, QWEN2, LLAMA = "InternLM2ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM"
SUPPORTED_LLMS = (INTERNLM2, QWEN2, LLAMA)
# defaults of the original config classes, for keys a config.json leaves out
INTERN_VIT_DEFAULTS = dict(num_channels=3, patch_size=14, image_size=224, qkv_bias=False, qk_normalization=True,
                           hidden_act="gelu", norm_type="rms_norm", layer_norm_eps=1e-6, drop_path_rate=0.0)
INTERNLM2_DEFAULTS = dict(hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2, bias=True, rope_theta=10000, rope_scaling=None)


class ConversionError(PipelineError, ValueError):
    """A checkpoint this converter cannot (or will not) convert; the message says why."""


# ---------------------------------------------------------------- config


def _vision_config(orig: dict[str, Any]) -> InternVLVisionConfig:
    v = {**INTERN_VIT_DEFAULTS, **orig["vision_config"]}
    if v["qk_normalization"] and v["layer_norm_eps"] != 1e-6:  # the native q/k RMSNorms have a fixed eps 1e-6
        raise ConversionError(f"InternViT with qk_normalization and layer_norm_eps {v['layer_norm_eps']} "
                              "(the native q/k norms use 1e-6)")
    if v["norm_type"] not in ("layer_norm", "rms_norm"):
        raise ConversionError(f"InternViT norm_type {v['norm_type']!r} is not supported")
    return InternVLVisionConfig(
        hidden_size=v["hidden_size"], num_hidden_layers=v["num_hidden_layers"],
        num_attention_heads=v["num_attention_heads"], intermediate_size=v["intermediate_size"],
        hidden_act=v["hidden_act"], attention_bias=v["qkv_bias"], use_qk_norm=v["qk_normalization"],
        norm_type=v["norm_type"], layer_norm_eps=v["layer_norm_eps"], num_channels=v["num_channels"],
        image_size=orig.get("force_image_size") or v["image_size"], patch_size=v["patch_size"],
        attention_dropout=v.get("attention_dropout", 0.0), hidden_dropout_prob=v.get("dropout", 0.0),
        use_mean_pooling=True,  # InternViT has no final LayerNorm; this makes the native one an Identity
        use_absolute_position_embeddings=True,
    )


def _internlm2_text_config(llm: dict[str, Any]) -> LlamaConfig:
    c = {**INTERNLM2_DEFAULTS, **llm}
    scaling = c["rope_scaling"]
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(c["rope_theta"])}
    if scaling is not None:
        kind = scaling.get("type") or scaling.get("rope_type")
        if kind not in ("linear", "dynamic"):  # the official InternLM2 code knows only these two
            raise ConversionError(f"InternLM2 rope_scaling type {kind!r} is not supported (linear, dynamic)")
        rope.update(rope_type=kind, factor=float(scaling["factor"]))
    heads = c["num_attention_heads"]
    return LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=c.get("num_key_value_heads") or heads, head_dim=c["hidden_size"] // heads,
        hidden_act=c["hidden_act"], max_position_embeddings=c["max_position_embeddings"],
        rms_norm_eps=c["rms_norm_eps"], rope_parameters=rope,
        attention_bias=c["bias"], mlp_bias=False,  # InternLM2's `bias` covers wqkv and wo; its MLP has none
        bos_token_id=c["bos_token_id"], eos_token_id=c["eos_token_id"], pad_token_id=c["pad_token_id"],
        tie_word_embeddings=False,
    )


def _hf_text_config(cls: type[PreTrainedConfig], llm: dict[str, Any]) -> PreTrainedConfig:
    """A Qwen2 / Llama ``llm_config`` is that class's own config: keep its fields (+ legacy rope keys)."""
    import dataclasses

    keep = {f.name for f in dataclasses.fields(cls)} - {"architectures", "transformers_version", "dtype",
                                                         "tie_word_embeddings"}
    kwargs = {k: v for k, v in llm.items() if k in keep or k in ("rope_theta", "rope_scaling")}
    return cls(**kwargs, tie_word_embeddings=False)


def llm_architecture(orig: dict[str, Any]) -> str:
    arch = ((orig.get("llm_config") or {}).get("architectures") or ["<none>"])[0]
    if arch not in SUPPORTED_LLMS:
        raise ConversionError(f"unsupported LLM architecture {arch} (supported: {', '.join(SUPPORTED_LLMS)})")
    return arch


def native_config(orig: dict[str, Any], image_token_id: int) -> InternVLConfig:
    """The ``InternVLConfig`` equivalent to an original ``InternVLChatConfig`` (as a dict)."""
    arch = llm_architecture(orig)
    if orig.get("ps_version", "v1") != "v2":
        raise ConversionError(f"pixel shuffle {orig.get('ps_version', 'v1')!r}: only 'v2' has a native equivalent")
    vision = _vision_config(orig)
    llm = orig["llm_config"]
    text = {INTERNLM2: _internlm2_text_config, QWEN2: lambda c: _hf_text_config(Qwen2Config, c),
            LLAMA: lambda c: _hf_text_config(LlamaConfig, c)}[arch](llm)
    if not 0 <= image_token_id < text.vocab_size:
        raise ConversionError(f"{IMG_CONTEXT} id {image_token_id} lies outside the LLM vocab ({text.vocab_size})")
    ratio = orig.get("downsample_ratio", 0.5)
    grid = vision.image_size[0] // vision.patch_size[0]
    return InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        image_seq_length=int(grid**2 * ratio**2), downsample_ratio=ratio, projector_hidden_act="gelu",
        vision_feature_layer=orig.get("select_layer", -1), vision_feature_select_strategy="default",
        tie_word_embeddings=False,  # InternVLChatConfig forces untied embeddings; the native default ties them
        dtype=orig.get("torch_dtype") or orig.get("dtype"),
    )


# ---------------------------------------------------------------- weights


def split_wqkv(wqkv: torch.Tensor, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InternLM2's packed ``wqkv`` rows [(H + 2 KV) D, ...] -> q [H D, ...], k [KV D, ...], v [KV D, ...].

    The rows form ``kv_heads`` blocks of ``(groups + 2) * head_dim``: the ``groups`` query heads that share a
    KV head, then its key, then its value (the official forward: ``b q (h gs d) -> b q h gs d``)."""
    rest = wqkv.shape[1:]
    blocks = wqkv.reshape(kv_heads, -1, head_dim, *rest)  # [KV, G + 2, D, ...]
    q = blocks[:, :-2].reshape(-1, *rest)
    return q, blocks[:, -2].reshape(-1, *rest), blocks[:, -1].reshape(-1, *rest)


@dataclass(frozen=True)
class Output:
    """One native tensor: ``pick`` makes it from the source tensor ``source`` (works on meta tensors too)."""

    name: str
    source: str
    pick: Callable[[torch.Tensor], torch.Tensor] = lambda t: t


# (original key regex, native name); in a layer, \1 is its index
_VIT, _VIT_OUT = r"^vision_model\.encoder\.layers\.(\d+)\.", r"model.vision_tower.encoder.layer.\1."
_LM, _LM_OUT = r"^language_model\.model\.layers\.(\d+)\.", r"model.language_model.layers.\1."
VISION_RENAMES = [
    (r"^vision_model\.embeddings\.class_embedding$", "model.vision_tower.embeddings.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "model.vision_tower.embeddings.position_embeddings"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "model.vision_tower.embeddings.patch_embeddings.projection."),
    (_VIT + r"norm1\.", _VIT_OUT + "layernorm_before."),
    (_VIT + r"norm2\.", _VIT_OUT + "layernorm_after."),
    (_VIT + r"ls1$", _VIT_OUT + "lambda_1"),
    (_VIT + r"ls2$", _VIT_OUT + "lambda_2"),
    (_VIT + r"attn\.proj\.", _VIT_OUT + "attention.projection_layer."),
    (_VIT + r"attn\.(q_norm|k_norm)\.", _VIT_OUT + r"attention.\2."),
    (_VIT + r"mlp\.(fc1|fc2)\.", _VIT_OUT + r"mlp.\2."),
    (r"^mlp1\.0\.", "model.multi_modal_projector.layer_norm."),
    (r"^mlp1\.1\.", "model.multi_modal_projector.linear_1."),
    (r"^mlp1\.3\.", "model.multi_modal_projector.linear_2."),
]
INTERNLM2_RENAMES = [
    (r"^language_model\.model\.tok_embeddings\.", "model.language_model.embed_tokens."),
    (r"^language_model\.model\.norm\.", "model.language_model.norm."),
    (_LM + r"attention_norm\.", _LM_OUT + "input_layernorm."),
    (_LM + r"ffn_norm\.", _LM_OUT + "post_attention_layernorm."),
    (_LM + r"attention\.wo\.", _LM_OUT + "self_attn.o_proj."),
    (_LM + r"feed_forward\.w1\.", _LM_OUT + "mlp.gate_proj."),
    (_LM + r"feed_forward\.w3\.", _LM_OUT + "mlp.up_proj."),
    (_LM + r"feed_forward\.w2\.", _LM_OUT + "mlp.down_proj."),
    (r"^language_model\.output\.", "lm_head."),
]
HF_LLM_RENAMES = [(r"^language_model\.model\.", "model.language_model."), (r"^language_model\.lm_head\.", "lm_head.")]
_VIT_QKV = re.compile(_VIT + r"attn\.qkv\.(weight|bias)$")
_WQKV = re.compile(_LM + r"attention\.wqkv\.(weight|bias)$")


def plan_outputs(keys: list[str], arch: str, text: PreTrainedConfig) -> list[Output]:
    """The native tensors, in source-key order; a source key nothing maps is an error, never dropped."""
    renames = VISION_RENAMES + (INTERNLM2_RENAMES if arch == INTERNLM2 else HF_LLM_RENAMES)
    outputs: list[Output] = []
    for key in keys:
        if m := _VIT_QKV.match(key):
            prefix = f"model.vision_tower.encoder.layer.{m[1]}.attention"
            outputs += [Output(f"{prefix}.{proj}_proj.{m[2]}", key, lambda t, i=i: t.chunk(3, dim=0)[i])
                        for i, proj in enumerate("qkv")]
        elif arch == INTERNLM2 and (m := _WQKV.match(key)):
            prefix = f"model.language_model.layers.{m[1]}.self_attn"
            kv, d = text.num_key_value_heads, text.head_dim
            outputs += [Output(f"{prefix}.{proj}_proj.{m[2]}", key, lambda t, i=i: split_wqkv(t, kv, d)[i])
                        for i, proj in enumerate("qkv")]
        else:
            for pattern, repl in renames:
                name, n = re.subn(pattern, repl, key)
                if n:
                    outputs.append(Output(name, key))
                    break
            else:
                raise ConversionError(f"weight {key} has no native counterpart (an unsupported checkpoint variant?)")
    return outputs


def source_tensors(src: Path) -> dict[str, tuple[Path, torch.dtype, tuple[int, ...]]]:
    """key -> (file, dtype, shape) from the safetensors headers (no tensor is read)."""
    index = src / "model.safetensors.index.json"
    if index.exists():
        files = sorted({src / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (src / "model.safetensors").exists():
        files = [src / "model.safetensors"]
    else:
        raise ConversionError(f"{src}: no model.safetensors or model.safetensors.index.json "
                              "(only safetensors checkpoints are read; pickled .bin files are not loaded)")
    found = {}
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                tensor = fh.get_slice(key)
                found[key] = (path, DTYPES[tensor.get_dtype()], tuple(tensor.get_shape()))
    return found


def _check_against_native(config: InternVLConfig, specs: list[TensorSpec]) -> None:
    """Every parameter of the native model, with its shape, and nothing else (built on the meta device)."""
    from transformers import InternVLForConditionalGeneration

    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {s.name: s.shape for s in specs}
    missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    if missing or extra or wrong:
        raise ConversionError(f"converted weights do not fit the native model: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}, wrong shapes {[(k, got[k], expected[k]) for k in wrong[:5]]}")


def _produce(outputs: list[Output], sources: dict[str, tuple[Path, torch.dtype, tuple[int, ...]]],
             progress: Any) -> Iterator[torch.Tensor]:
    """The native tensors one at a time; each source tensor is read once (the file is opened per tensor, so
    its pages are unmapped again and resident memory stays at about one tensor)."""
    key, tensor = None, None
    for out in outputs:
        if out.source != key:
            key = out.source
            with safe_open(str(sources[key][0]), framework="pt") as fh:
                tensor = fh.get_tensor(key)
        picked = out.pick(tensor).contiguous()
        progress.update(picked.numel() * picked.element_size())
        yield picked


# ---------------------------------------------------------------- the command


def source_signature(src: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of every file in ``src``: a rerun on an unchanged source is a no-op."""
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in src.iterdir() if p.is_file())


@dataclass(frozen=True)
class Converted:
    out: Path
    llm: str
    tensors: int
    shards: int
    bytes: int
    image_token_id: int
    skipped: bool = False

    def line(self) -> str:
        if self.skipped:
            return f"convert-base: {self.out} is up to date ({self.llm} base; --overwrite converts again)"
        return (f"convert-base: {self.out}: native InternVL ({self.llm} LLM), {self.tensors} tensors, "
                f"{self.bytes / 2**20:,.1f} MiB in {self.shards} shard(s), <IMG_CONTEXT> id {self.image_token_id}")


def _previous(out: Path, record: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The finished conversion in ``out`` of this very source (None: convert); refuses to clobber anything else."""
    done = out / "conversion.json"
    if overwrite or not out.exists():
        return None
    if not done.exists():
        raise ConversionError(f"{out} exists and is not a conversion output; choose another OUT_DIR or pass "
                              "--overwrite")
    previous = json.loads(done.read_text())
    if {k: previous.get(k) for k in record} != json.loads(json.dumps(record)):
        raise ConversionError(f"{out} exists and holds another conversion; remove it or pass --overwrite")
    return previous


def _notes(orig: dict[str, Any], config: InternVLConfig) -> list[str]:
    """Official behaviour the native classes do not share (none of it changes a fresh model's outputs)."""
    notes = []
    if drop_path := orig["vision_config"].get("drop_path_rate", 0.0):
        notes.append(f"the native vision tower has no stochastic depth (source drop_path_rate {drop_path})")
    rope = config.text_config.rope_parameters or {}
    if rope.get("rope_type") == "dynamic":
        notes.append(f"dynamic NTK rope beyond {config.text_config.max_position_embeddings} positions matches the "
                     "official model per sequence; the official module also keeps its enlarged base for later, "
                     "shorter sequences, the native one resets it")
    return notes


def _write_weights(tmp: Path, outputs: list[Output], specs: list[TensorSpec],
                   sources: dict[str, tuple[Path, torch.dtype, tuple[int, ...]]], max_shard_bytes: int,
                   show_progress: bool) -> int:
    """The safetensors shards (+ index when more than one); returns the shard count."""
    from tqdm.auto import tqdm

    shards = plan_shards(specs, max_shard_bytes)
    names = shard_file_names(len(shards))
    with tqdm(total=sum(s.nbytes for s in specs), unit="B", unit_scale=True, desc="convert-base",
              disable=not show_progress) as bar:
        tensors = _produce(outputs, sources, bar)
        for shard, name in zip(shards, names):
            write_shard(tmp / name, shard, islice(tensors, len(shard)))
    if len(shards) > 1:
        write_index(tmp, shards, names)
    return len(shards)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out`` (an old ``out`` is set aside first and removed after)."""
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.replace(old)
    tmp.replace(out)
    shutil.rmtree(old, ignore_errors=True)


def convert(src: Path | str, out: Path | str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
            overwrite: bool = False, show_progress: bool = True) -> Converted:
    """Convert the original checkpoint in ``src`` into a native InternVL directory ``out`` (atomically)."""
    from stages.families.internvl.convert_tokenizer import convert_tokenizer

    src, out = Path(src), Path(out)
    if not (src / "config.json").exists():
        raise ConversionError(f"{src}: no config.json")
    orig = json.loads((src / "config.json").read_text())
    if orig.get("model_type") != "internvl_chat":
        raise ConversionError(f"{src}: model_type {orig.get('model_type')!r} is not an original InternVL checkpoint "
                              "('internvl_chat'); native -hf checkpoints need no conversion")
    arch = llm_architecture(orig)
    record = {"converter_version": CONVERTER_VERSION, "source": str(src.resolve()), "files": source_signature(src)}
    if (previous := _previous(out, record, overwrite)) is not None:
        return Converted(out, arch, 0, 0, 0, previous["image_token_id"], skipped=True)

    template = orig.get("template") or "internlm2-chat"
    tokenizer = convert_tokenizer(src, template, orig.get("system_message"))
    image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    config = native_config(orig, image_token_id)
    sources = source_tensors(src)
    outputs = plan_outputs(list(sources), arch, config.text_config)
    specs = []
    for o in outputs:
        _, dtype, shape = sources[o.source]
        specs.append(TensorSpec(o.name, dtype, tuple(o.pick(torch.empty(shape, dtype=dtype, device="meta")).shape)))
    _check_against_native(config, specs)
    for note in _notes(orig, config):
        print(f"convert-base: note: {note}")

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed conversion
    tmp.mkdir(parents=True)
    shards = _write_weights(tmp, outputs, specs, sources, max_shard_bytes, show_progress)
    config.architectures = ["InternVLForConditionalGeneration"]
    config.save_pretrained(tmp)
    llm_eos = config.text_config.eos_token_id
    eos = list(dict.fromkeys([tokenizer.eos_token_id, *(llm_eos if isinstance(llm_eos, list) else [llm_eos])]))
    GenerationConfig(bos_token_id=config.text_config.bos_token_id, eos_token_id=eos,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(tmp)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "conversion.json").write_text(json.dumps({**record, "image_token_id": image_token_id, "llm": arch,
                                                     "template": template}, indent=2, ensure_ascii=False) + "\n")
    _replace(tmp, out)
    return Converted(out, arch, len(specs), shards, sum(s.nbytes for s in specs), image_token_id)
