"""``ase-mllm study`` end to end as a user types it, cut to two arms and one seed on the demo corpus: the recipe is
chosen on the validation split, summary.json follows the schema with the eat-vs-none contrast, the HTML report
shows the study, and a rerun trains nothing and writes the same summary."""
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
    from pipeline.study import SEARCH

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pipeline", "study", "--dataset", "demo", "--seeds", "1", "--arm", "eat",
               "--arm", "none"]
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "study: chosen on the validation split (forced choice): " in first.stdout
    searched = 1 + sum(len(values) - 1 for _, values in SEARCH)  # coordinate search: each option's other values
    assert first.stdout.count(" steps, loss") == searched + 2  # the choice's runs, then the arms
    study = isolated_work / "reports" / "demo" / "study"
    summary = json.loads((study / "summary.json").read_text())
    assert summary["test_images"] == 48 and summary["seeds"] == [0] and set(summary["arms"]) == {"eat", "none"}
    assert set(summary["contrasts"]) == {"eat_vs_none"} and summary["eat_recovery"] is None
    chosen = summary["chosen_on_validation"]
    assert all(chosen[flag.strip("-")] in values for flag, values in SEARCH)
    assert len(chosen["validation_forced_choice"]) == searched
    for arm in summary["arms"].values():
        assert 0.375 - 0.2 < arm["forced_choice_accuracy"] <= 1 and 0 < arm["distinct"] <= 1
    assert summary["arms"]["eat"]["mask_following"]["chance"] > 0.33 and summary["arms"]["none"]["mask_following"] is None
    probe = summary["feature_probe"]  # the base's tokens read by a linear probe; truth: the generator's
    assert probe["train_images"] == 168 and probe["test_images"] == 48
    exposure = {pooling: accuracy["exposure"] for pooling, accuracy in probe["per_attribute"].items()}
    assert exposure["true_mask"] > 0.8
    assert exposure["true_mask"] > max(exposure["even"], exposure["other_subject"]) + 0.25
    html = (isolated_work / "reports" / "demo" / "study-eat-s0" / "index.html").read_text()
    assert "Saliency study on demo" in html and "images/study.png" in html

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert " steps, loss" not in again.stdout  # every run was finished: nothing trained again
    assert json.loads((study / "summary.json").read_text()) == summary
