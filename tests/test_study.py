"""The saliency study's summary, contrasts, table and plot, on simulated arms whose true effects are known (the runs
themselves are ordinary fine-tunes, scored by tests of their own)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from stages.report import study

ATTRS = ("placement", "exposure", "colour", "focus")  # the aesthetic subject's
TRUE_RATE = {"truth": 0.8, "eat": 0.65, "uniform": 0.5, "shuffled": 0.5, "none": 0.5}  # P(attribute chosen right)
FOLLOWING = {"truth": 0.7, "eat": 0.5, "uniform": 0.2, "shuffled": 0.2}  # mask following of the IASC arms


def _simulated(seeds: int = 3, images: int = 300) -> dict[str, list[dict]]:
    """Per arm and seed, a run's scores as ``study.score_run`` writes them, drawn from the arm's true rates: each
    attribute chosen right with ``TRUE_RATE``; where the moved-to subject differs (every attribute here), the moved
    mask's choice names it with ``FOLLOWING``, the own mask's with 0.35 (the baseline: ignoring the map)."""
    rng = np.random.default_rng(0)
    results = {}
    for arm, rate in TRUE_RATE.items():
        runs = []
        for _ in range(seeds):
            right = rng.random((images, len(ATTRS))) < rate  # [images, attributes]
            following = None
            if arm in FOLLOWING:
                followed = rng.random((images, len(ATTRS))) < FOLLOWING[arm]
                baseline = rng.random((images, len(ATTRS))) < 0.35
                following = {"rate": float(followed.mean()), "baseline": float(baseline.mean()), "stayed": 0.2,
                             "n": followed.size,
                             "per_attribute": {k: {"rate": float(followed[:, j].mean()),
                                                   "baseline": float(baseline[:, j].mean()), "stayed": 0.2,
                                                   "n": images} for j, k in enumerate(ATTRS)},
                             "per_image": {f"img{i:04d}": [int(f.sum()), int(b.sum()), len(ATTRS)]
                                           for i, (f, b) in enumerate(zip(followed, baseline))}}
            runs.append({"forced_choice": float(right.mean()), "global_forced_choice": 0.6,
                         "forced_per_attribute": dict(zip(ATTRS, right.mean(0).tolist())),
                         "mask_following": following, "mask_following_rate": following and following["rate"],
                         "forced_correct": {f"img{i:04d}": float(r.mean()) for i, r in enumerate(right)},
                         "forced_correct_unplaced": {f"img{i:04d}": float(r[1:].mean()) for i, r in enumerate(right)},
                         "macro_precision": 0.7, "macro_recall": 0.2, "distinct": 0.8, "Bleu_1": 0.4, "CIDEr": 0.2})
        results[arm] = runs
    return results


CHOSEN = {"step": 200, "learning_curve": {arm: {100: 0.5, 200: 0.6, 300: 0.55} for arm in TRUE_RATE},
          "by": "the mean over the arms", "schedule": "300 steps"}
LADDER = {"base_reading": dict.fromkeys(ATTRS, 0.9), "named_oracle": 0.85, "eat_subject_preference": 2.5,
          "details": {"base_reading": {"images": 300}}}


def test_summary_finds_the_simulated_effects_and_follows_the_schema(isolated_work) -> None:
    results = _simulated()
    probe = {"per_attribute": {p: dict.fromkeys(ATTRS, acc) for p, acc in (("true_mask", 0.7), ("even", 0.5),
                                                                              ("other_subject", 0.45),
                                                                              ("all_tokens", 0.55))},
             "majority": dict.fromkeys(ATTRS, 0.35),
             "mean": {"true_mask": 0.7, "even": 0.5, "other_subject": 0.45, "all_tokens": 0.55},
             "train_images": 1750, "test_images": 300}
    md = study.write_study("demo-study", results, [0, 1, 2], 3, CHOSEN, probe, LADDER)
    summary = json.loads((md.parent / "summary.json").read_text())
    assert set(summary) >= {"generator_version", "test_images", "seeds", "arms", "contrasts", "eat_recovery",
                            "mask_following", "feature_probe", "base_reading", "named_oracle",
                            "eat_subject_preference", "notes"}
    assert summary["feature_probe"] == probe
    assert summary["base_reading"] == dict.fromkeys(ATTRS, 0.9) and summary["named_oracle"] == 0.85
    assert summary["eat_subject_preference"] == 2.5
    assert summary["test_images"] == 300 and summary["seeds"] == [0, 1, 2]
    assert set(summary["arms"]) == set(TRUE_RATE)
    for arm in summary["arms"].values():
        assert set(arm) >= {"forced_choice_accuracy", "per_attribute", "attr_precision", "attr_recall", "distinct"}
    following = summary["mask_following"]["truth"]
    assert set(following) >= {"rate", "ci95", "baseline", "difference", "stayed", "per_attribute"}
    assert following["rate"] == pytest.approx(0.7, abs=0.02) and following["baseline"] == pytest.approx(0.35, abs=0.02)
    assert following["ci95"][0] < following["rate"] < following["ci95"][1] and following["ci95"][0] > 0.6
    assert following["difference"]["diff"] == pytest.approx(0.35, abs=0.03) and following["difference"]["ci95"][0] > 0.25
    assert set(following["per_attribute"]) == set(ATTRS)
    assert summary["arms"]["eat"]["mask_following"]["rate"] == pytest.approx(0.5, abs=0.02)
    assert summary["arms"]["none"]["mask_following"] is None
    c = summary["contrasts"]
    assert set(c) == {"truth_vs_uniform", "truth_vs_uniform_unplaced", "eat_vs_none", "uniform_vs_none",
                      "shuffled_vs_uniform"}
    assert c["truth_vs_uniform"]["diff"] == pytest.approx(0.3, abs=0.03) and c["truth_vs_uniform"]["ci95"][0] > 0.2
    assert c["truth_vs_uniform_unplaced"]["diff"] == pytest.approx(0.3, abs=0.04)
    assert c["truth_vs_uniform"]["p"] < 0.01 and c["eat_vs_none"]["ci95"][0] > 0
    for null in ("uniform_vs_none", "shuffled_vs_uniform"):  # no true difference: the CI covers 0
        assert c[null]["ci95"][0] < 0 < c[null]["ci95"][1], c[null]
    recovery = summary["eat_recovery"]
    assert recovery["share"] == pytest.approx(0.5, abs=0.1) and recovery["ci95"][0] < 0.5 < recovery["ci95"][1]
    assert "1/4001" in summary["notes"]["p"] and "conditional on the trained models" in summary["notes"]["p"]
    text = md.read_text()
    assert f"| truth vs uniform | {c['truth_vs_uniform']['diff']:+.3f} |" in text
    assert "| truth vs uniform (exposure, colour, focus) |" in text
    assert "300 test images" in text and "every run is scored at step 200" in text
    assert "| R2 naming: the base's forced choice with the aesthetic subject named | 0.850 |" in text
    assert "| R4 finding: the EAT's subject preference (1 = none) | 2.50 |" in text
    assert f"{following['rate']:.0%} (95 % CI" in text and "EAT maps recover" in text
    assert "pooled by the true mask 0.700 (placement 0.70," in text and "all tokens 0.550" in text
    assert (md.parent / "study.csv").read_text().splitlines()[0].startswith("arm,seed,Forced choice")
    with Image.open(md.parent / "study.png") as img:
        assert img.format == "PNG" and img.width > 600


def test_a_gain_the_ci_cannot_tell_from_zero_has_no_share(isolated_work) -> None:
    """eat_recovery is a ratio over the true masks' gain: null (with the reason) while that gain's CI includes 0."""
    results = _simulated()
    results["truth"] = results["uniform"]
    summary = study.summarise(results, [0, 1, 2], 3, CHOSEN)
    assert summary["contrasts"]["truth_vs_uniform"]["ci95"][0] <= 0
    assert summary["eat_recovery"]["share"] is None and "includes 0" in summary["eat_recovery"]["why"]


def test_run_names_are_distinct_per_arm_and_seed() -> None:
    names = {study.run_name(a, s) for a in study.ARMS for s in range(5)}
    assert len(names) == len(study.ARMS) * 5 and all(n.startswith("study-") for n in names)
    assert [a.name for a in study.ARMS] == ["truth", "eat", "uniform", "shuffled", "none"]


def test_the_study_keeps_the_demo_recipe_with_its_own_schedule() -> None:
    """Only the step count and the checkpoints differ from the demo's fine-tuning arguments; every checkpoint of the
    learning curve is kept."""
    from pipeline.demo import FINETUNE_ARGS
    from pipeline.study import CURVE_EVERY, STEPS, study_args

    args = study_args(FINETUNE_ARGS)
    assert len(args) == len(FINETUNE_ARGS) + 2
    changed = {args[i - 1] for i, (a, b) in enumerate(zip(args, FINETUNE_ARGS)) if a != b}
    assert changed <= {"--max-steps", "--save-steps"}
    assert args[args.index("--max-steps") + 1] == str(STEPS) and args[args.index("--save-steps") + 1] == str(CURVE_EVERY)
    assert args[-2:] == ["--keep-checkpoints", str(STEPS // CURVE_EVERY)]


def test_the_step_is_chosen_by_the_mean_over_the_arms() -> None:
    """No arm's curve alone decides: the best mean wins, the earlier of equals."""
    from pipeline.study import choose_step

    assert choose_step({"truth": {100: 0.9, 200: 0.6}, "uniform": {100: 0.3, 200: 0.7}}) == 200
    assert choose_step({"truth": {100: 0.5, 200: 0.5}, "none": {100: 0.6, 200: 0.6}}) == 100
