"""``ase-mllm study`` end to end as a user types it, cut to two arms, one seed and a short schedule on the demo
corpus: the checkpoint is chosen by the validation learning curve, summary.json follows the schema with the
eat-vs-none contrast and the ladder's rungs, the HTML report shows the study, and a rerun trains nothing and writes
the same summary."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_study_two_arms_one_seed(isolated_work: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pipeline", "study", "--dataset", "demo", "--seeds", "1", "--arm", "eat",
               "--arm", "none", "--steps", "40", "--curve-every", "20"]
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "study: validation forced choice per checkpoint (mean over arms): step 20: " in first.stdout
    assert first.stdout.count(" steps, loss") == 2  # one run per arm: seed 0's is also the learning curve's
    study = isolated_work / "reports" / "demo" / "study"
    summary = json.loads((study / "summary.json").read_text())
    assert summary["test_images"] == 48 and summary["seeds"] == [0] and set(summary["arms"]) == {"eat", "none"}
    assert set(summary["contrasts"]) == {"eat_vs_none"} and summary["eat_recovery"] is None
    chosen = summary["chosen_on_validation"]
    assert chosen["step"] in (20, 40) and set(chosen["learning_curve"]) == {"eat", "none"}
    assert all(set(c) == {"20", "40"} for c in chosen["learning_curve"].values())  # JSON keys
    for arm in summary["arms"].values():
        assert 0.375 - 0.2 < arm["forced_choice_accuracy"] <= 1 and 0 < arm["distinct"] <= 1
    eat = summary["arms"]["eat"]["mask_following"]
    assert 0 <= eat["ci95"][0] <= eat["rate"] <= eat["ci95"][1] <= 1 and summary["arms"]["none"]["mask_following"] is None
    # the rungs, against the generator's truth: the shipped base reads the subjects (exposure at least) and the
    # EAT's preference is a ratio of mask ratios
    reading = summary["base_reading"]
    assert set(reading) == {"placement", "exposure", "colour", "focus"} and reading["exposure"] > 0.6, reading
    assert 0.375 - 0.2 < summary["named_oracle"] <= 1 and summary["eat_subject_preference"] > 0
    probe = summary["feature_probe"]  # the base's tokens read by a linear probe; truth: the generator's
    assert probe["train_images"] == 168 and probe["test_images"] == 48
    exposure = {reader: accuracy["exposure"] for reader, accuracy in probe["per_attribute"].items()}
    assert exposure["true_mask"] > 0.8
    assert exposure["true_mask"] > max(exposure["even"], exposure["other_subject"]) + 0.25
    html = (isolated_work / "reports" / "demo" / "study-eat-s0" / "index.html").read_text()
    assert "Saliency study on demo" in html and "images/study.png" in html

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert " steps, loss" not in again.stdout  # every run was finished: nothing trained again
    assert json.loads((study / "summary.json").read_text()) == summary
