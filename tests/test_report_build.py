"""``report`` orchestration: every file of reports/<dataset>/<run>/, table rows equal to the real
pycocoevalcap scores of the stored predictions, the ablation table from runs with / without IASC and
fine-tuning, and incrementality (unchanged inputs are not rescored; changed references are).

Real scoring costs two JVMs (~7 s) per row, so the first test scores one row for real; the second
replaces the scorer by a call counter to check which rows are (re)scored."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.manifest import load_manifest
from pipeline.paths import dataset_dir
from storage.atomic import write_parquet_atomic
from storage.tables import COMMENTS_SCHEMA, read_table
from test_generate import make_run, toy_runs  # noqa: F401 (fixture)

java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's scorers need java")
DECODE_TOKENS = 12


def _build(manifest, **kw):
    from stages.report.build import build_report
    from stages.report.generate import DecodeConfig

    return build_report("toy", "r", manifest, split="train", decode=DecodeConfig(max_new_tokens=DECODE_TOKENS),
                        progress=False, **kw)


@java
def test_report_files_tables_and_gallery(toy_runs: Path) -> None:  # noqa: F811
    from stages.report.generate import DecodeConfig, predictions_dir, read_predictions
    from stages.report.metrics import score

    manifest = load_manifest(toy_runs)
    first = _build(manifest, baselines=False, ablation=False)  # one row: ours
    out = first.directory
    for name in ("metrics.json", "per_image.jsonl", "table.md", "table.csv", "predictions.parquet", "index.html"):
        assert (out / name).exists(), name
    ours = read_predictions(predictions_dir("toy", "r", "final", DecodeConfig(max_new_tokens=DECODE_TOKENS)), "train")
    refs = {}
    for row in read_table("toy", "comments").to_pylist():
        refs.setdefault(row["image_id"], []).append(row["text"])
    assert len(ours) == 5
    oracle, _, _ = score(ours, {i: refs[i] for i in ours}, progress=False)  # F's scorer on the raw predictions
    metrics = json.loads((out / "metrics.json").read_text())
    rows = {r["method"]: r for r in csv.DictReader((out / "table.csv").open())}
    for header, key in (("B1", "Bleu_1"), ("B4", "Bleu_4"), ("M", "METEOR"), ("R", "ROUGE_L"), ("C", "CIDEr")):
        assert float(rows["ASE-MLLM (r)"][header]) == pytest.approx(oracle[key]) == pytest.approx(metrics[key])

    preds = pq.read_table(out / "predictions.parquet").to_pylist()
    assert {p["image_id"]: p["caption"] for p in preds} == ours
    assert all(p["references"] == refs[p["image_id"]] for p in preds)
    html = (out / "index.html").read_text()
    assert "Table I layout" in html and html.count('class="item"') == 5
    # run r has IASC: the saliency probe is in the report, its own-map critiques are the report's
    probe = json.loads((out / "probe.json").read_text())
    assert probe["captions"]["own"] == [ours[i] for i in probe["image_ids"]] and len(ours) == 5
    assert "Saliency probe: 5 train images" in html and "probe-saliency r (train, 5 images)" in first.line()
    assert len(list((out / "overlays").glob("*.png"))) == 5  # heatmaps from the store, one per image


def test_rows_ablation_runs_and_incremental_rescoring(toy_runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    import stages.report.metrics as metrics_module
    from stages.report.build import ablation_runs
    from stages.report.metrics import METRIC_KEYS

    manifest = load_manifest(toy_runs)
    make_run("toy", "noiasc", fusion="none", seed=3)  # the "FT, no IASC" condition
    calls: list[dict] = []

    def counting_score(candidates, references, **kw):  # stands in for the JVM scorers
        calls.append(candidates)
        value = float(len(calls))
        return ({k: value for k in METRIC_KEYS}, {i: {k: value for k in METRIC_KEYS} for i in candidates}, {})

    monkeypatch.setattr(metrics_module, "score", counting_score)
    first = _build(manifest)
    names = set(first.rows)
    assert {"ASE-MLLM (r)", "ASE-MLLM (noiasc)", "untrained (same model before fine-tuning)"} <= names
    assert {"retrieval: consensus", "retrieval: nearest image"} <= names
    assert len(calls) == len(names) == len(first.rescored)
    assert ablation_runs("toy", "r") == {(True, True): "r", (True, False): "noiasc", (False, False): "untrained"}
    ablation = {r["method"]: r for r in csv.DictReader((first.directory / "ablation.csv").open())}
    assert float(ablation["FT, no IASC"]["B1"]) == first.rows["ASE-MLLM (noiasc)"]["Bleu_1"]
    assert float(ablation["FT + IASC"]["B1"]) == first.rows["ASE-MLLM (r)"]["Bleu_1"]
    table = {r["method"] for r in csv.DictReader((first.directory / "table.csv").open())}
    assert "ASE-MLLM (noiasc)" not in table  # Table I: this run and its baselines only

    second = _build(manifest)
    assert second.rescored == [] and len(calls) == len(names)
    assert "images/study.png" not in (second.directory / "index.html").read_text()

    from pipeline.paths import study_dir
    from stages.report.study import write_study  # a study of this dataset joins the next build's page
    row = {"Bleu_1": 0.4, "CIDEr": 0.3, "macro_precision": 0.7, "macro_recall": 0.4, "distinct": 0.5,
           "forced_choice": 0.6, "global_forced_choice": 0.5, "forced_per_attribute": {"focus": 0.6},
           "forced_correct": {"i0": 0.5, "i1": 0.7}, "forced_correct_unplaced": {"i0": 0.3, "i1": 0.7},
           "mask_following": None}
    write_study("toy", {"eat": [row, row], "none": [row, row]}, [0, 1], 3,
                {"step": 100, "learning_curve": {"eat": {100: 0.6}, "none": {100: 0.5}}, "by": "the mean over the arms",
                 "schedule": "100 steps"})
    html = (_build(manifest).directory / "index.html").read_text()
    assert "IASC + EAT maps (eat)" in html and "eat vs none" in html and 'src="images/study.png"' in html
    assert (second.directory / "images" / "study.png").read_bytes() == (study_dir("toy") / "study.png").read_bytes()

    comments = read_table("toy", "comments").to_pylist()  # one more reference for one image: rescore every row
    comments.append({"image_id": "i0", "comment_id": "extra", "text": "the light is lovely here.", "aspect": None})
    write_parquet_atomic(dataset_dir("toy") / "comments.parquet", pa.Table.from_pylist(comments, schema=COMMENTS_SCHEMA))
    third = _build(manifest)
    assert set(third.rescored) == names and len(calls) == 2 * len(names)
