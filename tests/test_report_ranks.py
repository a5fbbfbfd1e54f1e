"""``report`` under torchrun: 2 gloo ranks share generation and one rank scores the complete split, giving the
numbers of a single-process report of the same run; a split with images lacking a prediction is refused
unless ``--allow-partial``, and then the tables say so."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.manifest import load_manifest
from pipeline.paths import reports_dir, runs_dir
from test_generate import toy_runs  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's scorers need java")
# the toy run's 5 training images, one per generate() call so both runs decode each image alike
REPORT = ["report", "--dataset", "toy", "--run-name", "r", "--split", "train", "--max-new-tokens", "12",
          "--batch-size", "1", "--no-baselines", "--no-ablation", "--gallery", "2"]


def free_port() -> int:
    """A TCP port no one listens on now (fixed ports collide with other torchrun jobs on the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _numbers(path: Path) -> dict[str, float]:
    return {k: v for k, v in json.loads(path.read_text()).items() if isinstance(v, (int, float))}


@java
@pytest.mark.slow
def test_torchrun_report_equals_single_process(toy_runs: Path) -> None:  # noqa: F811
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "pipeline", "--manifest", str(toy_runs), *REPORT], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    out = reports_dir("toy") / "r"
    expected = _numbers(out / "metrics.json")
    expected_predictions = pq.read_table(out / "predictions.parquet").to_pylist()
    assert {"Bleu_1", "CIDEr", "METEOR"} <= expected.keys()
    shutil.rmtree(out)
    shutil.rmtree(runs_dir("toy") / "r" / "predictions")

    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", str(free_port())]
    shared = subprocess.run([*torchrun, "-m", "pipeline", "--manifest", str(toy_runs), *REPORT], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert shared.returncode == 0, shared.stdout[-3000:] + shared.stderr[-3000:]
    lines = shared.stdout.splitlines()
    generated = sorted(int(x.split()[1]) for x in lines if x.startswith("generate: "))
    assert generated == [2, 3], lines  # each rank generated its share of the 5 images
    assert sum(x.startswith("report: ") and "rows" in x for x in lines) == 1, lines  # one rank scored
    assert sum("rank 0 scores the split" in x for x in lines) == 1, lines
    assert _numbers(out / "metrics.json") == expected
    assert pq.read_table(out / "predictions.parquet").to_pylist() == expected_predictions


@java
def test_missing_predictions_are_refused_unless_allow_partial(toy_runs: Path, tmp_path: Path) -> None:  # noqa: F811
    from stages.report.build import build_report
    from stages.report.generate import DecodeConfig

    (tmp_path / "toy_images" / "img0.png").unlink()  # image i0 can no longer be captioned
    manifest = load_manifest(toy_runs)
    kw = dict(split="train", decode=DecodeConfig(max_new_tokens=6), baselines=False, ablation=False, gallery=0,
              progress=False)
    with pytest.raises(ValueError, match=r"1 of 5 train images have no prediction \(e.g. i0: .*--allow-partial"):
        build_report("toy", "r", manifest, **kw)
    assert not (reports_dir("toy") / "r" / "metrics.json").exists()
    summary = build_report("toy", "r", manifest, allow_partial=True, **kw)
    out = summary.directory
    assert "Partial: ASE-MLLM (r) scored on 4 of 5 images" in (out / "table.md").read_text()
    assert json.loads((out / "rows.json").read_text())["ASE-MLLM (r)"]["partial"] == "4 of 5 images"
    assert len((out / "per_image.jsonl").read_text().splitlines()) == 4
