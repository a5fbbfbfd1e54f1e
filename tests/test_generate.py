"""Generation: left-padded batches equal batch-1 decoding (greedy and beam), batch-1 greedy equals a
plain no-cache argmax loop over the full forward, torchrun-style rank shares cover the split exactly
once, and a SIGKILL'd ``generate`` rerun ends with exactly the predictions of an uninterrupted run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.manifest import load_manifest
from pipeline.paths import runs_dir
from test_finetune_data import WORDS, make_manifest, make_store, make_toy

REPO = Path(__file__).resolve().parents[1]


def tiny_captioner_parts(fusion: str = "cross_attention", seed: int = 0):
    """Tokenizer + a tiny model whose weights are perturbed so its output depends on the image and history."""
    from stages.families.internvl.model import build_tiny_model
    from stages.families.internvl.tokenizer import IMG_CONTEXT, train_bpe

    tok = train_bpe([f"{a}, {b}." for a in WORDS for b in WORDS], vocab_size=300)
    torch.manual_seed(seed)
    model = build_tiny_model("tiny", vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids(IMG_CONTEXT),
                             fusion=fusion)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a freshly initialised tiny LLM repeats one token forever; this one does not
        for name, p in model.named_parameters():
            if p.ndim >= 2 or name.endswith("gate"):
                p.add_(torch.randn(p.shape, generator=g) * 0.15)
    return model, tok


def tiles_for(model):
    from stages.families.internvl.dataset import TileSpec
    from stages.families.internvl.model import tokens_per_tile

    return TileSpec(tile_size=224, max_tiles=2, tokens_per_tile=tokens_per_tile(model.config))


def make_run(dataset: str, run: str, fusion: str = "cross_attention", seed: int = 0) -> Path:
    """A run dir as ``finetune`` leaves it (final/ weights + tokenizer, tokenizer/, run_config.json)."""
    model, tok = tiny_captioner_parts(fusion, seed)
    run_dir = runs_dir(dataset) / run
    model.save_pretrained(str(run_dir / "final"))
    tok.save_pretrained(str(run_dir / "final"))
    tok.save_pretrained(str(run_dir / "tokenizer"))
    cfg = {"fusion": fusion, "seed": seed, "tiny_model": "tiny", "allow_missing_saliency": False,
           "tiles": asdict(tiles_for(model))}
    (run_dir / "run_config.json").write_text(json.dumps(cfg))
    return run_dir


@pytest.fixture
def toy_runs(tmp_path: Path):
    """Toy dataset (5 train, 1 test), its saliency store and run 'r'; returns the manifest path."""
    shas = make_toy(tmp_path, n_test=1)
    path = make_manifest(tmp_path)
    make_store(load_manifest(path), shas)
    make_run("toy", "r")
    return path


def _images(n: int = 4) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(64, 48), (40, 90), (56, 56), (120, 40), (48, 64)][:n]
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for w, h in sizes]


def test_batched_decoding_equals_batch_one_and_plain_argmax() -> None:
    from stages.families.captioner import DecodeConfig
    from stages.families.internvl.captioner import InternVLCaptioner

    model, tok = tiny_captioner_parts()
    cap = InternVLCaptioner(model, tok, tiles_for(model), torch.device("cpu"))
    rng = np.random.default_rng(1)
    shapes = [(14, 14), (56, 56), (7, 9), (14, 14)]  # EAT's, ground-truth masks', odd: padded in one batch
    prompts = [cap.prepare(img, rng.random(shape)) for img, shape in zip(_images(), shapes)]
    assert len({len(p.input_ids) for p in prompts}) > 1  # 1- and 3-tile images: real padding in the batch
    for decode in (DecodeConfig(max_new_tokens=10), DecodeConfig(max_new_tokens=8, num_beams=3)):
        batched = cap.generate_ids(prompts, decode)
        single = [cap.generate_ids([p], decode)[0] for p in prompts]
        assert batched == single, decode
    assert len({tuple(s) for s in single}) > 1  # outputs depend on the image

    # oracle: greedy as a plain loop of full forwards (no KV cache, no generate, no precomputed features)
    from stages.families.internvl.collate import saliency_inputs

    p = prompts[1]
    ids = torch.tensor([p.input_ids])
    with torch.no_grad():
        for _ in range(10):
            logits = model(input_ids=ids, pixel_values=p.pixel_values,
                           **saliency_inputs([p.saliency_map], [p.tile_grid])).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    plain = ids[0, len(p.input_ids):].tolist()
    eos = tok.eos_token_id
    plain = plain[: plain.index(eos) + 1] if eos in plain else plain
    assert cap.generate_ids([p], DecodeConfig(max_new_tokens=10))[0] == plain


def test_no_map_and_constant_map_both_mean_uniform_saliency() -> None:
    """Generation: a missing map and a constant map (all zeros, as LayerCAM gives when no gradient is positive)
    both give all-ones saliency tiles, hence the same critique; a real map gives different tiles."""
    from stages.families.internvl.collate import saliency_inputs
    from stages.families.captioner import DecodeConfig
    from stages.families.internvl.captioner import InternVLCaptioner

    model, tok = tiny_captioner_parts()
    cap = InternVLCaptioner(model, tok, tiles_for(model), torch.device("cpu"))
    img = _images()[1]  # 3 tiles (2 + thumbnail)

    def tiles(p):  # the saliency tiles the model makes of a prompt
        return model.model.saliency_tiles(p.pixel_values, *saliency_inputs([p.saliency_map], [p.tile_grid]).values())

    none, zeros, flat = (cap.prepare(img, m) for m in (None, np.zeros((14, 14)), np.full((14, 14), 2.5)))
    for p in (none, zeros, flat):
        assert tiles(p).shape[0] == 3 and torch.equal(tiles(p), torch.ones_like(tiles(p)))
    decode = DecodeConfig(max_new_tokens=10)
    assert cap.generate_ids([zeros], decode) == cap.generate_ids([none], decode)
    real = cap.prepare(img, np.random.default_rng(0).random((14, 14)))
    assert not torch.equal(tiles(real), tiles(none))


def test_rank_shares_cover_the_split_once(toy_runs: Path) -> None:
    from stages.report.generate import generate_split, read_predictions

    manifest = load_manifest(toy_runs)
    kw = dict(split="train", decode=_short(), batch_size=2, progress=False)
    whole = generate_split("toy", "r", manifest, **kw)
    expected = read_predictions(whole.directory, "train")
    assert whole.generated == 5 and not whole.failed and len(expected) == 5
    shutil.rmtree(whole.directory)
    counts = [generate_split("toy", "r", manifest, rank=r, world=2, **kw).generated for r in (0, 1)]
    assert sum(counts) == 5 and min(counts) > 0
    assert read_predictions(whole.directory, "train") == expected
    again = generate_split("toy", "r", manifest, **kw)  # incremental: nothing left to do
    assert again.generated == 0 and again.reused == 5


# the `generate` command exactly as registered by stages/report/run_cli.py, on a bare typer app
GENERATE_CLI = """
import typer
from pipeline import context
from stages.report.run_cli import register
app = typer.Typer()
@app.callback()
def main(manifest: str = typer.Option(...)) -> None:
    context.set_manifest_path(manifest)
register(app)
app()
"""


def _short():
    from stages.report.generate import DecodeConfig

    return DecodeConfig(max_new_tokens=12)


def test_sigkill_then_rerun_equals_uninterrupted(toy_runs: Path, isolated_work: Path) -> None:
    from stages.report.generate import DecodeConfig, generate_split, predictions_dir, read_predictions

    manifest = load_manifest(toy_runs)
    shutil.copytree(runs_dir("toy") / "r", runs_dir("toy") / "whole")
    cmd = [sys.executable, "-c", GENERATE_CLI, "--manifest", str(toy_runs), "generate", "--dataset", "toy",
           "--run", "r", "--split", "train", "--batch-size", "1", "--part-size", "1", "--max-new-tokens", "40"]
    env = {**os.environ, "ASE_WORK": str(isolated_work), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    decode = DecodeConfig(max_new_tokens=40)  # slow enough (~1 s per image) to be killed part-way
    out_dir = predictions_dir("toy", "r", "final", decode)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(out_dir.glob("part-*.parquet"))) < 1:
        time.sleep(0.01)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = read_predictions(out_dir, "train")
    assert 1 <= len(done) < 5  # killed part-way
    rerun = generate_split("toy", "r", manifest, split="train", decode=decode, progress=False)
    assert rerun.reused == len(done) and rerun.generated == 5 - len(done)
    whole = generate_split("toy", "whole", manifest, split="train", decode=decode, progress=False)
    assert read_predictions(out_dir, "train") == read_predictions(whole.directory, "train")
    assert not list(out_dir.glob(".*.tmp"))  # the kill left no half-written part behind


def test_new_weights_discard_old_predictions(toy_runs: Path) -> None:
    from stages.report.generate import generate_split

    manifest = load_manifest(toy_runs)
    first = generate_split("toy", "r", manifest, split="test", decode=_short(), progress=False)
    assert first.generated == 1
    time.sleep(0.01)
    make_run("toy", "r", seed=5)  # training again rewrote final/
    second = generate_split("toy", "r", manifest, split="test", decode=_short(), progress=False)
    assert second.generated == 1 and second.reused == 0


def test_a_slow_rank_never_deletes_fresh_parts_of_new_weights(tmp_path: Path) -> None:
    """Ranks open the predictions directory independently: a rank that still finds the old settings must
    delete only the old weights' parts, not the parts a faster rank already wrote for the new weights."""
    import pyarrow as pa

    from stages.report.generate import PREDICTION_SCHEMA, _open_predictions, _settings_key, read_predictions
    from storage.atomic import write_json_atomic, write_parquet_atomic

    old, new = {"checkpoint_fingerprint": "a"}, {"checkpoint_fingerprint": "b"}
    write_json_atomic(tmp_path / "generation.json", old)

    def part(meta: dict, rank: int, image_id: str, caption: str) -> None:
        rows = [{"image_id": image_id, "split": "test", "caption": caption}]
        write_parquet_atomic(tmp_path / f"part-{_settings_key(meta)}-r{rank:03d}-0.parquet",
                             pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA))

    part(old, 1, "img1", "old caption")
    part(new, 0, "img0", "fresh caption")  # the fast rank 0 already works under the new weights
    assert read_predictions(tmp_path) == {"img1": "old caption"}  # generation.json still names the old settings
    _open_predictions(tmp_path, new)  # the slow rank 1 arrives
    assert read_predictions(tmp_path) == {"img0": "fresh caption"}
    assert sorted(p.name.split("-")[1] for p in tmp_path.glob("part-*")) == [_settings_key(new)]
