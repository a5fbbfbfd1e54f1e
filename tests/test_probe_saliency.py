"""``ase-mllm probe-saliency`` as a user types it, on a tiny run whose output depends on its map: the own-map
critiques are the ones ``generate`` writes for the report, another image's maps change some, the counts
match the critiques in probe.json, a rerun generates nothing and leaves probe.json as it was, a probe killed
after one condition resumes to the same file, and a run trained without IASC is refused with one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.manifest import load_manifest
from pipeline.paths import reports_dir
from test_finetune_data import make_manifest, make_store, make_toy
from test_generate import make_run

REPO = Path(__file__).resolve().parents[1]


def _cli(manifest: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline", "--manifest", str(manifest), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_probe_saliency_cli_on_a_trained_run(tmp_path: Path) -> None:
    from stages.report.generate import generate_split, read_predictions

    shas = make_toy(tmp_path, n_test=4)
    manifest = make_manifest(tmp_path)
    make_store(load_manifest(manifest), shas)
    make_run("toy", "r")  # weights perturbed, gates open: its critiques depend on the image and the map
    make_run("toy", "plain", fusion="none")

    first = _cli(manifest, "probe-saliency", "--dataset", "toy", "--run", "r")
    assert first.returncode == 0, first.stderr
    probe_json = reports_dir("toy") / "r" / "probe.json"
    probe = json.loads(probe_json.read_text())
    captions = probe["captions"]
    assert len(probe["image_ids"]) == 4 and all(len(captions[c]) == 4 for c in ("own", "other", "uniform"))
    for c in ("other", "uniform"):
        assert probe["changed_vs_own"][c] == sum(a != b for a, b in zip(captions["own"], captions[c]))
    assert probe["changed_vs_own"]["other"] > 0  # this model reads its map
    assert probe["attribute_scores"] == {}  # no ground truth for a folder dataset
    summary = first.stdout.strip().splitlines()[-1]
    assert summary.startswith("probe-saliency r (test, 4 images): another image's maps change "
                              f"{probe['changed_vs_own']['other']}/4 critiques")
    assert "12 generated" in summary and "| another image's maps |" in first.stdout

    # oracle: the critiques `generate` (the report's path) writes with the store's maps
    g = generate_split("toy", "r", load_manifest(manifest), "test", progress=False)
    report = read_predictions(g.directory, "test")
    assert captions["own"] == [report[i] for i in probe["image_ids"]]

    from typer.testing import CliRunner

    from pipeline.cli import app

    before = probe_json.read_bytes()  # the rerun and the refusal in-process (the command's code, no new interpreter)
    again = CliRunner().invoke(app, ["--manifest", str(manifest), "probe-saliency", "--dataset", "toy", "--run", "r"])
    assert again.exit_code == 0, again.output
    assert "0 generated" in again.output and probe_json.read_bytes() == before

    # a probe killed after its first condition left probe.json with that condition only: the rerun generates
    # the other two and ends where the uninterrupted probe ended
    killed = {**probe, "captions": {"own": captions["own"]}, "changed_vs_own": {}, "attribute_scores": {}}
    probe_json.write_text(json.dumps(killed))
    resumed = CliRunner().invoke(app, ["--manifest", str(manifest), "probe-saliency", "--dataset", "toy", "--run", "r"])
    assert resumed.exit_code == 0, resumed.output
    assert "8 generated" in resumed.output and probe_json.read_bytes() == before

    refused = CliRunner().invoke(app, ["--manifest", str(manifest), "probe-saliency", "--dataset", "toy",
                                       "--run", "plain"])
    assert refused.exit_code == 1
    assert refused.output.strip().splitlines() == ["error: run 'plain' was trained without IASC (--fusion none): its "
                                                   "critiques cannot depend on a saliency map"]


def test_probe_scores_attributes_where_the_dataset_knows_them(tmp_path: Path) -> None:
    """On a synthetic split, each condition's critiques are scored against the generator's attributes; the own-map
    scores equal those of the critiques `generate` writes, matched by image id. The shipped demo base, loaded
    with zero gates, ignores its map: the probe reports no critique changed."""
    from pipeline.manifest import DatasetSpec
    from pipeline.paths import runs_dir
    from stages.families.internvl.model import load_base
    from stages.families.internvl.tokenizer import load_tokenizer
    from stages.synthetic.truth import ground_truth
    from stages.ingest.run import ingest_dataset
    from stages.report.attributes import attribute_scores
    from stages.report.generate import generate_split, read_predictions
    from stages.report.probe import probe_saliency
    from storage.tables import read_table

    spec = DatasetSpec(name="syn", format="synthetic", root=tmp_path / "syn", options={"n": 24, "seed": 3})
    ingest_dataset(spec, echo=lambda s: None)
    manifest = load_manifest(make_manifest(tmp_path))
    make_store(manifest, read_table("syn", "images")["sha256"].to_pylist())
    base = REPO / "stages" / "finetune" / "data" / "demo_base"
    model, _ = load_base(base)
    run_dir = runs_dir("syn") / "r"
    model.save_pretrained(str(run_dir / "final"))
    load_tokenizer(base).save_pretrained(str(run_dir / "final"))
    tiles = {"tile_size": 224, "max_tiles": 1, "tokens_per_tile": 64}  # the demo's `--max-tiles 1`
    (run_dir / "run_config.json").write_text(json.dumps({"fusion": "cross_attention", "base": str(base),
                                                         "tiles": tiles}))

    probe = probe_saliency("syn", "r", manifest, progress=False)
    assert probe.n >= 2 and probe.changed == {"own": 0, "other": 0, "uniform": 0}
    report = read_predictions(generate_split("syn", "r", manifest, progress=False).directory, "test")
    ids = json.loads(probe.path.read_text())["image_ids"]
    assert sorted(ids) == sorted(report)  # the whole (small) split
    truth = {i: t["attributes"] for i, t in ground_truth("syn").items()}
    expected = attribute_scores({i: report[i] for i in ids}, truth)
    assert probe.scores["own"] == expected and expected["macro_precision"] > 0  # the base remarks on attributes
    # forced choices: zero gates, so no moved map changes one; the own-map choices are the report's
    from stages.report.forced_choice import forced_choice_scores, run_choices

    assert probe.forced["other"]["changed"] == probe.forced["uniform"]["changed"] == 0
    assert probe.forced["other"]["choices"] == 6 * probe.n
    (choices,), _ = run_choices("syn", "r", manifest, "test", set(ids))
    assert probe.forced["own"]["accuracy"] == forced_choice_scores(choices, truth)["accuracy"]
