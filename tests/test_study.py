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
    rng = np.random.default_rng(0)
    results = {}
    for arm, rate in TRUE_RATE.items():
        runs = []
        for _ in range(seeds):
            right = rng.random((images, len(ATTRS))) < rate  # [images, attributes]
            following = {"rate": FOLLOWING[arm], "stayed": 0.2, "chance": 0.45, "n": 700,
                         "per_attribute": {k: {"rate": FOLLOWING[arm], "stayed": 0.2, "chance": 0.45, "n": 175}
                                           for k in ATTRS}} if arm in FOLLOWING else None
            runs.append({"forced_choice": float(right.mean()), "global_forced_choice": 0.6,
                         "forced_per_attribute": dict(zip(ATTRS, right.mean(0).tolist())),
                         "mask_following": following, "mask_following_rate": following and following["rate"],
                         "forced_correct": {f"img{i:04d}": float(r.mean()) for i, r in enumerate(right)},
                         "macro_precision": 0.7, "macro_recall": 0.2, "distinct": 0.8, "Bleu_1": 0.4, "CIDEr": 0.2})
        results[arm] = runs
    return results


def test_summary_finds_the_simulated_effects_and_follows_the_schema(isolated_work) -> None:
    results = _simulated()
    chosen = {"cross_attention_lr": "3e-3", "max_steps": "100", "by": "the eat arm, seed 0",
              "validation_forced_choice": {"3e-3 x 100": 0.6}, "what": "The rate and steps were"}
    probe = {"per_attribute": {p: dict.fromkeys(ATTRS, acc) for p, acc in (("true_mask", 0.7), ("even", 0.5),
                                                                              ("other_subject", 0.45))},
             "majority": dict.fromkeys(ATTRS, 0.35), "mean": {"true_mask": 0.7, "even": 0.5, "other_subject": 0.45},
             "train_images": 1750, "test_images": 300}
    md = study.write_study("demo-study", results, [0, 1, 2], 2, chosen, probe)
    summary = json.loads((md.parent / "summary.json").read_text())
    assert set(summary) >= {"generator_version", "test_images", "seeds", "arms", "contrasts", "eat_recovery",
                            "mask_following", "feature_probe"}
    assert summary["feature_probe"] == probe
    assert summary["test_images"] == 300 and summary["seeds"] == [0, 1, 2]
    assert set(summary["arms"]) == set(TRUE_RATE)
    for arm in summary["arms"].values():
        assert set(arm) >= {"forced_choice_accuracy", "per_attribute", "attr_precision", "attr_recall", "distinct"}
    following = summary["mask_following"]
    assert {k: following[k] for k in ("truth", "chance", "stayed")} == pytest.approx({"truth": 0.7, "chance": 0.45,
                                                                                       "stayed": 0.2})
    assert set(following["per_attribute"]) == set(ATTRS)
    assert following["per_attribute"]["focus"] == pytest.approx({"rate": 0.7, "stayed": 0.2, "chance": 0.45})
    assert summary["arms"]["eat"]["mask_following"]["rate"] == pytest.approx(0.5) and summary["arms"]["none"]["mask_following"] is None
    c = summary["contrasts"]
    assert set(c) == {"truth_vs_uniform", "eat_vs_none", "uniform_vs_none", "shuffled_vs_uniform"}
    assert c["truth_vs_uniform"]["diff"] == pytest.approx(0.3, abs=0.03) and c["truth_vs_uniform"]["ci95"][0] > 0.2
    assert c["truth_vs_uniform"]["p"] < 0.01 and c["eat_vs_none"]["ci95"][0] > 0
    for null in ("uniform_vs_none", "shuffled_vs_uniform"):  # no true difference: the CI covers 0
        assert c[null]["ci95"][0] < 0 < c[null]["ci95"][1], c[null]
    recovery = summary["eat_recovery"]
    assert recovery["share"] == pytest.approx(0.5, abs=0.1) and recovery["ci95"][0] < 0.5 < recovery["ci95"][1]
    text = md.read_text()
    assert f"| truth vs uniform | {c['truth_vs_uniform']['diff']:+.3f} |" in text
    assert "300 test images" in text and "validation split (the eat arm, seed 0: 3e-3 x 100: 0.600)" in text
    assert "70% of the choices describe that subject (a random subject: 45%)" in text
    assert "EAT maps recover" in text and "placement 70% / 20% / 45%" in text
    assert "pooled by the true mask 0.700 (placement 0.70," in text and "evenly 0.500" in text
    assert (md.parent / "study.csv").read_text().splitlines()[0].startswith("arm,seed,Forced choice")
    with Image.open(md.parent / "study.png") as img:
        assert img.format == "PNG" and img.width > 600


def test_run_names_are_distinct_per_arm_and_seed() -> None:
    names = {study.run_name(a, s) for a in study.ARMS for s in range(5)}
    assert len(names) == len(study.ARMS) * 5 and all(n.startswith("study-") for n in names)
    assert [a.name for a in study.ARMS] == ["truth", "eat", "uniform", "shuffled", "none"]


def test_the_study_chooses_its_rate_with_the_demo_recipe_otherwise_unchanged() -> None:
    from pipeline.demo import FINETUNE_ARGS
    from pipeline.study import option, with_option

    args = with_option(FINETUNE_ARGS, "--cross-attention-lr", "3e-3")
    assert option(args, "--cross-attention-lr") == "3e-3" and len(args) == len(FINETUNE_ARGS)
    changed = [i for i, (a, b) in enumerate(zip(args, FINETUNE_ARGS)) if a != b]
    assert changed == [args.index("--cross-attention-lr") + 1]


def test_the_demo_recipe_is_where_the_study_search_starts() -> None:
    from pipeline.demo import FINETUNE_ARGS
    from pipeline.study import SEARCH, option

    assert {flag: option(FINETUNE_ARGS, flag) for flag, _ in SEARCH} == {flag: values[0] for flag, values in SEARCH}
