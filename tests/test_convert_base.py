"""convert-base: original InternVL2 checkpoints -> native transformers InternVL, without remote code.

Oracles: ``../shared/fixtures/internvl2/`` (a tiny InternVL2 in the original layout with the official OpenGVLab
code's vision features, logits and greedy ids, fp32, plus a variant where dynamic NTK rope is active);
sentencepiece itself for the tokenizer (the official InternLM2Tokenizer encodes each piece of text between added
tokens with ``sp_model.encode`` and prepends ``<s>``); InternVL's ``conversation.py`` templates as published
(written out below); the safetensors library for the streaming shard writer.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_finetune_data import WORDS

REPO = Path(__file__).resolve().parents[1]
FIXTURE = "fixtures/internvl2"
REMOTE_CODE_TRAP = "raise RuntimeError('remote code of the checkpoint must never run')\n"
PROMPT = "Comment on this image from an aesthetic perspective."


# ---------------------------------------------------------------- an InternLM2-style tokenizer, built here


def _sentencepiece_bpe(vocab_size: int, byte_fallback: bool, corpus: list[str]) -> bytes:
    """A sentencepiece BPE model with InternLM2's settings (identity normalisation, dummy prefix, <unk> <s> </s>
    at 0-2, chat tokens reserved as ``[UNUSED_TOKEN_145/146]`` control pieces)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=byte_fallback, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        control_symbols=["[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]"], allow_whitespace_only_pieces=True,
        split_digits=True, minloglevel=2)
    return buf.getvalue()


def _corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    base = WORDS + [PROMPT, "system", "user", "assistant", "构图 光线 色彩 主体", "x = f(y)  # code\n\tindent",
                    "The photo has a pleasing balance of warm and cool tones, with the subject placed off centre.",
                    "Exposure is slightly high; the sky loses detail. Consider a graduated filter next time!"]
    return [" ".join(rng.sample(base, 3)) + rng.choice(["", "\n", "  ", "?\n"]) for _ in range(n)]


def write_internlm2_tokenizer(directory: Path, image_ids: tuple[int, int, int] = (251, 252, 250),
                              vocab_size: int = 250, byte_fallback: bool = False) -> dict[str, int]:
    """InternVL2's tokenizer files (tokenizer.model + tokenizer_config.json naming the remote InternLM2Tokenizer);
    ``image_ids``: ids of <img>, </img>, <IMG_CONTEXT> (added after the sentencepiece vocab). Returns token -> id."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    model = _sentencepiece_bpe(vocab_size, byte_fallback, _corpus(400))
    (directory / "tokenizer.model").write_bytes(model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    ids = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_end|>": sp.piece_to_id("[UNUSED_TOKEN_145]"),
           "<|im_start|>": sp.piece_to_id("[UNUSED_TOKEN_146]"),
           "<img>": image_ids[0], "</img>": image_ids[1], "<IMG_CONTEXT>": image_ids[2]}
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for t, i in ids.items()}
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": added, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False, "model_max_length": 8192, "tokenizer_class": "InternLM2Tokenizer",
    }, indent=2))
    (directory / "tokenization_internlm2.py").write_text(REMOTE_CODE_TRAP)
    return ids


def fixture_checkpoint(shared_dir: Path, dest: Path, variant: str | None = None) -> Path:
    """The shared tiny InternVL2 (original layout) + a tokenizer with its token ids + remote-code traps."""
    src = shared_dir / FIXTURE
    dest.mkdir(parents=True)
    shutil.copy(src / "model.safetensors", dest)
    for name in ("config.json", "generation_config.json"):
        shutil.copy((src / variant if variant else src) / name, dest)
    for name in ("modeling_internvl_chat.py", "modeling_internlm2.py", "configuration_internvl_chat.py"):
        (dest / name).write_text(REMOTE_CODE_TRAP)
    write_internlm2_tokenizer(dest)
    return dest


# ---------------------------------------------------------------- the official outputs


def _load_native(out: Path):
    from transformers import InternVLForConditionalGeneration

    model, info = InternVLForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("variant", [None, "variant_dynamic_ntk"])
def test_converted_fixture_reproduces_the_official_model(shared_dir: Path, tmp_path: Path, variant: str | None) -> None:
    from stages.families.internvl.convert import convert

    src = fixture_checkpoint(shared_dir, tmp_path / "src", variant)
    done = convert(src, tmp_path / "out", show_progress=False)
    assert (done.tensors, done.image_token_id) == (67, 250)  # 55 original tensors, 6 fused qkv -> 18
    model = _load_native(tmp_path / "out")
    folder = shared_dir / FIXTURE / (variant or "")
    inputs = load_file(folder / "inputs.safetensors")
    expected = load_file(folder / "expected.safetensors")
    pixels, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        vision = model.model.vision_tower(pixel_values=pixels).last_hidden_state  # [4, 17, 32]
        features = model.model.get_image_features(pixels, return_dict=True).pooler_output  # [4, 4, 64]
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits  # [1, 30, 256]
        generated = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=8,
                                   do_sample=False, eos_token_id=255, pad_token_id=0)
    torch.testing.assert_close(vision, expected["vision_last_hidden_state"], rtol=0, atol=1e-5)
    torch.testing.assert_close(features.reshape(expected["vit_embeds"].shape), expected["vit_embeds"], rtol=0,
                               atol=1e-5)
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
    assert torch.equal(generated[:, ids.shape[1]:], expected["generated_ids"])  # official: new tokens only


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "LlamaForCausalLM"])
def test_qwen2_and_llama_llms_convert_faithfully(shared_dir: Path, tmp_path: Path, arch: str) -> None:
    """An InternVL2.5-style checkpoint: the fixture's InternViT + mlp1 with a transformers Qwen2 / Llama LLM.
    Oracle: the official ``vit_embeds`` placed into that LLM's own forward (inputs_embeds)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from stages.families.internvl.convert import convert
    from stages.families.internvl.tokenizer import train_bpe

    llm_config = {"architectures": [arch], "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
                  "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
                  "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
                  "bad_words_ids": None, "max_length": 20}  # v4 configs carry generation leftovers
    config_cls = Qwen2Config if arch == "Qwen2ForCausalLM" else LlamaConfig
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(config_cls(**{k: v for k, v in llm_config.items()
                                                          if k not in ("architectures", "torch_dtype", "bad_words_ids",
                                                                       "max_length", "rope_scaling")})).eval()
    src = tmp_path / "src"
    src.mkdir()
    fixture = load_file(shared_dir / FIXTURE / "model.safetensors")
    weights = {k: v for k, v in fixture.items() if not k.startswith("language_model.")}
    save_file({**weights, **{f"language_model.{k}": v.contiguous() for k, v in llm.state_dict().items()}},
              src / "model.safetensors")
    config = json.loads((shared_dir / FIXTURE / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "llm_config": llm_config, "template": "internvl2_5"}))
    tokenizer = train_bpe(_corpus(200), vocab_size=300)  # ChatML + InternVL image tokens, a native class
    tokenizer.save_pretrained(str(src))
    image_token = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")

    assert convert(src, tmp_path / "out", show_progress=False).image_token_id == image_token
    model = _load_native(tmp_path / "out")
    inputs = load_file(shared_dir / FIXTURE / "inputs.safetensors")
    expected = load_file(shared_dir / FIXTURE / "expected.safetensors")
    ids = inputs["input_ids"].masked_fill(inputs["input_ids"] == image_token, 7)  # text ids != the image token
    ids = ids.masked_fill(ids == 250, image_token)  # [1, 30] with 16 image tokens
    with torch.no_grad():
        embeds = llm.get_input_embeddings()(ids)
        embeds[ids == image_token] = expected["vit_embeds"].reshape(-1, 64)
        oracle = llm(inputs_embeds=embeds).logits
        logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits
    torch.testing.assert_close(logits, oracle, rtol=0, atol=1e-5)


def test_load_base_on_the_converted_fixture_misses_only_cross_attention(shared_dir: Path, tmp_path: Path) -> None:
    """The ASE-MLLM model built from the conversion starts as the official model (zero gates)."""
    from stages.families.internvl.collate import saliency_inputs
    from stages.families.internvl.convert import convert
    from stages.families.fusion import cross_attention_parameters
    from stages.families.internvl.model import load_base

    convert(fixture_checkpoint(shared_dir, tmp_path / "src"), tmp_path / "out", show_progress=False)
    model, missing = load_base(tmp_path / "out", dtype=torch.float32)
    assert missing == sorted(n for n, _ in cross_attention_parameters(model)) and missing
    inputs = load_file(shared_dir / FIXTURE / "inputs.safetensors")
    expected = load_file(shared_dir / FIXTURE / "expected.safetensors")
    pixels = inputs["pixel_values"]
    saliency = saliency_inputs([torch.rand(14, 14, generator=torch.Generator().manual_seed(0))],
                               [(pixels.shape[0], 1, 0)])  # any map: the gates are zero
    with torch.no_grad():
        logits = model.eval()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                              pixel_values=pixels, **saliency).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)


def test_load_base_points_an_original_checkpoint_at_convert_base(shared_dir: Path, tmp_path: Path) -> None:
    from stages.families.internvl.model import load_base

    from pipeline.errors import PipelineError

    src = fixture_checkpoint(shared_dir, tmp_path / "src")
    with pytest.raises(PipelineError, match="ase-mllm convert-base"):  # the CLI prints it as one line
        load_base(src)


def test_finetune_and_generation_run_unchanged_on_a_converted_base(shared_dir: Path, tmp_path: Path) -> None:
    """The README's InternVL2-8B commands on the tiny fixture: convert-base, finetune --base, then generation."""
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.manifest import load_manifest
    from stages.report.generate import DecodeConfig, generate_split, read_predictions
    from test_finetune_data import make_manifest, make_store, make_toy

    shas = make_toy(tmp_path)
    manifest = make_manifest(tmp_path)
    make_store(load_manifest(manifest), shas)
    base = tmp_path / "internvl2-native"
    src = fixture_checkpoint(shared_dir, tmp_path / "src")
    converted = CliRunner().invoke(app, ["convert-base", str(src), str(base)])
    assert converted.exit_code == 0, converted.output
    trained = CliRunner().invoke(app, [
        "--manifest", str(manifest), "finetune", "--dataset", "toy", "--run", "converted", "--base", str(base),
        "--max-steps", "6", "--lr", "2e-3", "--batch-size", "2", "--per-device", "2", "--max-tiles", "2",
        "--workers", "0", "--logging-steps", "1", "--save-steps", "6"])
    assert trained.exit_code == 0, trained.output
    assert re.search(r"new parameters initialised", trained.output)  # only the cross-attention is new
    losses = [json.loads(line)["loss"] for line in (Path(os.environ["ASE_WORK"]) / "runs/toy/converted/metrics.jsonl")
              .read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 6 and losses[-1] < losses[0]
    run = generate_split("toy", "converted", load_manifest(manifest), decode=DecodeConfig(max_new_tokens=6),
                         batch_size=2, progress=False)
    assert run.generated == 1 and not run.failed
    assert len(read_predictions(run.directory, "test")) == 1


# ---------------------------------------------------------------- tokenizer and chat template


def test_tokenizer_encodes_like_sentencepiece_and_loads_without_remote_code(tmp_path: Path) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from stages.families.internvl.convert_tokenizer import convert_tokenizer
    from stages.families.internvl.tokenizer import load_tokenizer

    src = tmp_path / "src"
    ids = write_internlm2_tokenizer(src, image_ids=(400, 401, 402), vocab_size=400, byte_fallback=True)
    tok = convert_tokenizer(src, "internlm2-chat")
    tok.save_pretrained(str(tmp_path / "out"))
    loaded = load_tokenizer(tmp_path / "out")  # our stage-2 loader: AutoTokenizer, no remote code, image tokens
    assert type(loaded).__name__ == type(AutoTokenizer.from_pretrained(str(tmp_path / "out"))).__name__
    assert {t: loaded.convert_tokens_to_ids(t) for t in ids} == ids
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token == "</s>" and loaded.bos_token_id == 1
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    specials = list(ids)  # the slow tokenizer never splits its added tokens (incl. <unk> <s> </s>)
    texts = _corpus(300, seed=1) + [
        "", " ", "  two leading spaces", "trailing  ", "a\n\nb", "naïve café 😀 ünïcödé", "構圖很好",
        "x" * 60,
        "<s><|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nComment on this image.<|im_end|>",
        "<|im_start|>assistant\nLovely light<|im_end|></s>", "12345.678 tokens, digits split", "\t\ttabs\t",
        "an <unk> in the text, <s> too",
    ]
    for text in texts:
        expected = [ids["<s>"]]
        for piece in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
            expected += [ids[piece]] if piece in specials else sp.encode(piece)
        assert loaded(text)["input_ids"] == expected, text
        assert loaded(text, add_special_tokens=False)["input_ids"] == expected[1:], text
    plain = _corpus(50, seed=2)
    for text in plain:
        assert loaded.decode(loaded(text, add_special_tokens=False)["input_ids"]) == sp.decode(sp.encode(text))


def test_chat_templates_render_internvl_conversations(tmp_path: Path) -> None:
    """Expected strings: InternVL conversation.py, MPT style: system_template.format(system) + sep, then
    role + message + sep per turn, and the bare assistant role to prompt (the official chat() / training format)."""
    from stages.families.internvl.convert_tokenizer import convert_tokenizer

    src = tmp_path / "src"
    write_internlm2_tokenizer(src)
    system2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
    system25 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
    user = [{"role": "user", "content": "<image>\n" + PROMPT}]
    turn = user + [{"role": "assistant", "content": "Lovely light."}]
    cases = {
        ("internlm2-chat", "prompt"): f"<s><|im_start|>system\n{system2}<|im_end|><|im_start|>user\n<image>\n{PROMPT}"
                                      "<|im_end|><|im_start|>assistant\n",
        ("internlm2-chat", "turn"): f"<s><|im_start|>system\n{system2}<|im_end|><|im_start|>user\n<image>\n{PROMPT}"
                                    "<|im_end|><|im_start|>assistant\nLovely light.<|im_end|>",
        ("internvl2_5", "prompt"): f"<s><|im_start|>system\n{system25}<|im_end|>\n<|im_start|>user\n<image>\n"
                                   f"{PROMPT}<|im_end|>\n<|im_start|>assistant\n",
    }
    for (template, kind), expected in cases.items():
        tok = convert_tokenizer(src, template)
        rendered = tok.apply_chat_template(user if kind == "prompt" else turn, tokenize=False,
                                           add_generation_prompt=kind == "prompt")
        assert rendered == expected, (template, kind)
    tok = convert_tokenizer(src, "internlm2-chat")
    own = tok.apply_chat_template([{"role": "system", "content": "Be brief."}] + user, tokenize=False,
                                  add_generation_prompt=True)
    assert own.startswith("<s><|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n")


# ---------------------------------------------------------------- refusals, CLI, atomic output


def _original_config(llm_arch: str) -> dict:
    return {"model_type": "internvl_chat", "template": "internlm2-chat", "ps_version": "v2",
            "llm_config": {"architectures": [llm_arch]}, "vision_config": {}}


@pytest.mark.parametrize("arch", ["Phi3ForCausalLM", "MistralForCausalLM"])
def test_unknown_llm_architectures_are_refused_in_one_line(tmp_path: Path, arch: str) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(_original_config(arch)))
    result = CliRunner().invoke(app, ["convert-base", str(src), str(tmp_path / "out")])
    assert result.exit_code != 0 and not (tmp_path / "out").exists()
    message = str(result.exception)
    assert f"unsupported LLM architecture {arch}" in message and "\n" not in message


def test_cli_converts_and_a_rerun_is_a_no_op(shared_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    src = fixture_checkpoint(shared_dir, tmp_path / "src")
    out = tmp_path / "out"
    first = CliRunner().invoke(app, ["convert-base", str(src), str(out), "--max-shard-size", "200000"])
    assert first.exit_code == 0, first.output
    assert f"convert-base: {out}: native InternVL (InternLM2ForCausalLM LLM), 67 tensors" in first.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # 630 KB in 200 KB shards
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = CliRunner().invoke(app, ["convert-base", str(src), str(out)])
    assert again.exit_code == 0 and "up to date" in again.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    config = src / "config.json"
    config.write_text(config.read_text().replace('"select_layer": -1', '"select_layer": -1 '))  # a changed source
    changed = CliRunner().invoke(app, ["convert-base", str(src), str(out)])
    assert changed.exit_code != 0 and "--overwrite" in str(changed.exception)
    assert CliRunner().invoke(app, ["convert-base", str(src), str(out), "--overwrite"]).exit_code == 0


def internvl2_config(llm_layers: int, vit_layers: int = 24, vocab: int = 92553, vit_hidden: int = 1024,
                     llm_hidden: int = 4096, llm_ffn: int = 14336, heads: int = 32, kv_heads: int = 8) -> dict:
    """An original InternVL2 config.json; the defaults are InternVL2-8B's (InternViT-300M + InternLM2.5-7B)."""
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "internlm2-chat",
        "downsample_ratio": 0.5, "force_image_size": 448, "ps_version": "v2", "select_layer": -1,
        "dynamic_image_size": True, "use_thumbnail": True, "max_dynamic_patch": 12, "torch_dtype": "bfloat16",
        "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                          "hidden_size": vit_hidden, "num_hidden_layers": vit_layers,
                          "num_attention_heads": vit_hidden // 64, "intermediate_size": 4 * vit_hidden,
                          "image_size": 448, "patch_size": 14, "qkv_bias": True, "qk_normalization": False,
                          "norm_type": "layer_norm", "layer_norm_eps": 1e-6},
        "llm_config": {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "vocab_size": vocab,
                       "hidden_size": llm_hidden, "intermediate_size": llm_ffn, "num_hidden_layers": llm_layers,
                       "num_attention_heads": heads, "num_key_value_heads": kv_heads, "bias": False,
                       "rms_norm_eps": 1e-5, "rope_theta": 1000000, "rope_scaling": {"type": "dynamic", "factor": 2.0},
                       "max_position_embeddings": 32768, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
    }


def original_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an original InternVL2 (InternLM2) state dict for ``config``."""
    v, t = config["vision_config"], config["llm_config"]
    c, f, n = v["hidden_size"], v["intermediate_size"], (v["image_size"] // v["patch_size"]) ** 2 + 1
    shapes = {"vision_model.embeddings.class_embedding": (1, 1, c),
              "vision_model.embeddings.position_embedding": (1, n, c),
              "vision_model.embeddings.patch_embedding.weight": (c, 3, 14, 14),
              "vision_model.embeddings.patch_embedding.bias": (c,)}
    rms = v["norm_type"] == "rms_norm"
    for i in range(v["num_hidden_layers"]):
        layer = f"vision_model.encoder.layers.{i}."
        shapes |= {layer + "attn.qkv.weight": (3 * c, c), layer + "attn.proj.weight": (c, c),
                   layer + "attn.proj.bias": (c,), layer + "mlp.fc1.weight": (f, c), layer + "mlp.fc1.bias": (f,),
                   layer + "mlp.fc2.weight": (c, f), layer + "mlp.fc2.bias": (c,), layer + "ls1": (c,),
                   layer + "ls2": (c,)}
        shapes |= {layer + "attn.qkv.bias": (3 * c,)} if v["qkv_bias"] else {}
        shapes |= {layer + f"attn.{qk}.weight": (c,) for qk in ("q_norm", "k_norm")} if v["qk_normalization"] else {}
        params = ("weight",) if rms else ("weight", "bias")
        shapes |= {layer + f"{norm}.{p}": (c,) for norm in ("norm1", "norm2") for p in params}
    h, ffn, vocab = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    d = h // t["num_attention_heads"]
    shapes |= {"mlp1.0.weight": (4 * c,), "mlp1.0.bias": (4 * c,), "mlp1.1.weight": (h, 4 * c), "mlp1.1.bias": (h,),
               "mlp1.3.weight": (h, h), "mlp1.3.bias": (h,), "language_model.model.tok_embeddings.weight": (vocab, h),
               "language_model.model.norm.weight": (h,), "language_model.output.weight": (vocab, h)}
    for i in range(t["num_hidden_layers"]):
        layer = f"language_model.model.layers.{i}."
        shapes |= {layer + "attention.wqkv.weight": ((t["num_attention_heads"] + 2 * t["num_key_value_heads"]) * d, h),
                   layer + "attention.wo.weight": (h, h), layer + "feed_forward.w1.weight": (ffn, h),
                   layer + "feed_forward.w3.weight": (ffn, h), layer + "feed_forward.w2.weight": (h, ffn),
                   layer + "attention_norm.weight": (h,), layer + "ffn_norm.weight": (h,)}
    return shapes


def make_original_checkpoint(dest: Path, config: dict, shard_bytes: int = 1 << 30, seed: int = 0) -> int:
    """Random bf16 weights for ``config`` in safetensors shards + index, and the tokenizer; returns the bytes."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    vocab = config["llm_config"]["vocab_size"]
    write_internlm2_tokenizer(dest, image_ids=(vocab - 9, vocab - 8, vocab - 7))
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]  # planned first: only one shard is ever in memory
    size = 0
    for name, shape in original_shapes(config).items():
        if size >= shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += 2 * math.prod(shape)
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {name: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16) for name, shape in group}
        save_file(shard, dest / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file)
        total += sum(2 * t.numel() for t in shard.values())
        del shard
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return total


def test_internvit_6b_style_vision_tower_maps_completely(tmp_path: Path) -> None:
    """InternViT-6B's variant (InternVL2-26B and up): RMSNorm, q/k normalisation, no qkv bias; every tensor lands
    in the native model (nothing missing or left over) with its values."""
    from stages.families.internvl.convert import convert

    config = internvl2_config(llm_layers=1, vit_layers=2, vocab=512, vit_hidden=64, llm_hidden=64, llm_ffn=128,
                              heads=4, kv_heads=2)
    config["vision_config"] |= {"norm_type": "rms_norm", "qk_normalization": True, "qkv_bias": False}
    make_original_checkpoint(tmp_path / "src", config)
    convert(tmp_path / "src", tmp_path / "out", show_progress=False)
    model = _load_native(tmp_path / "out")
    source = load_file(tmp_path / "src" / "model-00001-of-00001.safetensors")
    layer = model.model.vision_tower.encoder.layer[1]
    assert torch.equal(layer.attention.q_norm.weight, source["vision_model.encoder.layers.1.attn.q_norm.weight"])
    assert torch.equal(layer.layernorm_after.weight, source["vision_model.encoder.layers.1.norm2.weight"])
    assert layer.attention.q_proj.bias is None and type(layer.layernorm_before).__name__ == "InternVLVisionRMSNorm"


CONVERT = """
import sys
from stages.families.internvl.convert import convert
print(convert(sys.argv[1], sys.argv[2], max_shard_bytes=int(sys.argv[3]), show_progress=False).line())
"""


@pytest.mark.slow
def test_a_killed_conversion_leaves_nothing_and_the_rerun_matches(tmp_path: Path) -> None:
    """SIGKILL while shards are being written: no OUT_DIR; the rerun equals an uninterrupted conversion, byte for
    byte."""
    from stages.families.internvl.convert import convert

    config = internvl2_config(llm_layers=4, vit_layers=2, vocab=8000, vit_hidden=64, llm_hidden=256, llm_ffn=512,
                              heads=4, kv_heads=2)
    src = tmp_path / "src"
    make_original_checkpoint(src, config, shard_bytes=4 << 20)
    out, whole, shard = tmp_path / "out", tmp_path / "whole", 256 << 10
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CONVERT, str(src), str(out), str(shard)], cwd=REPO, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = tmp_path / ".out.tmp"
    deadline = time.time() + 120
    while len(list(tmp.glob("model-*.safetensors"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the conversion ended before it could be killed"
    assert not out.exists() and tmp.exists()
    convert(src, out, max_shard_bytes=shard, show_progress=False)  # the rerun
    convert(src, whole, max_shard_bytes=shard, show_progress=False)
    assert not tmp.exists()
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(p.name for p in whole.iterdir()) and len([f for f in files if f.startswith("model-")]) > 3
    for name in files:
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
