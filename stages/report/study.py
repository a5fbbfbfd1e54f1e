"""The saliency study by ground truth: arms x seeds, every run an ordinary fine-tune, scored on the test split.

Arms (``ARMS``) differ only in what the IAS cross-attention sees, in training and generation alike:
``truth`` (the synthetic corpus's true aesthetic masks: the upper bound), ``eat`` (the EAT's maps: the method),
``uniform`` (all-ones maps: the architecture without saliency information), ``shuffled`` (another image's true
mask: a map of the right kind in the wrong place) and ``none`` (no IASC, fusion none).

Each run is scored by forced choice (stages/report/forced_choice.py: per image, the share of its aesthetic
subject's attributes whose true value the model finds likeliest; the global attributes apart), by mask
following (IASC arms: the same choices with the true mask moved onto another subject, the share that describe
that subject), by the attribute precision / recall of its generated critiques, their diversity and BLEU-1 /
CIDEr. Contrasts pair the per-image forced-choice outcome over images x seeds (stages/report/paired.py: mean
difference, two-way bootstrap 95 % CI, paired permutation p): truth vs uniform, eat vs none, uniform vs none,
shuffled vs uniform; ``eat_recovery`` is (eat - uniform) / (truth - uniform). ``feature_probe``: how much of the
aesthetic subject a linear reader finds in the base's tokens pooled by the true mask, evenly or over another
subject (stages/report/feature_probe.py), the ceiling of what selecting by the map can add.
Written to ``reports/<dataset>/study/``: ``summary.json``, ``study.md``, ``study.csv``, ``study.png`` and
``runs/<run>.json`` (each run's scores, reused while its checkpoint is unchanged).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.manifest import Manifest
from pipeline.paths import runs_dir, study_dir
from stages.synthetic.attributes import ATTRIBUTES
from stages.synthetic.corpus import SUBJECT_ATTRIBUTES
from storage.atomic import write_bytes_atomic, write_json_atomic


@dataclass(frozen=True)
class Arm:
    name: str
    fusion: str  # cross_attention | none
    saliency: str  # stages/finetune/saliency_source.py
    label: str


ARMS = (
    Arm("truth", "cross_attention", "truth", "IASC + true masks"),
    Arm("eat", "cross_attention", "eat", "IASC + EAT maps"),
    Arm("uniform", "cross_attention", "uniform", "IASC + uniform maps"),
    Arm("shuffled", "cross_attention", "shuffled", "IASC + another image's mask"),
    Arm("none", "none", "eat", "no IASC"),
)
CONTRASTS = {"truth_vs_uniform": ("truth", "uniform"), "eat_vs_none": ("eat", "none"),
             "uniform_vs_none": ("uniform", "none"), "shuffled_vs_uniform": ("shuffled", "uniform")}
# (header, key) of the study table and plot, mean ± sd over seeds
COLUMNS = (("Forced choice", "forced_choice"), ("Follows moved mask", "mask_following_rate"),
           ("Forced choice, global", "global_forced_choice"), ("Attr P", "macro_precision"),
           ("Attr R", "macro_recall"), ("Distinct", "distinct"), ("B1", "Bleu_1"), ("CIDEr", "CIDEr"))
SCORES_VERSION = 2  # of what score_run computes (2: mask following per attribute); older cached scores are redone
CHANCE = statistics.fmean(1 / len(ATTRIBUTES[k]) for k in SUBJECT_ATTRIBUTES)  # forced choice, aesthetic subject


def run_name(arm: Arm, seed: int) -> str:
    return f"study-{arm.name}-s{seed}"


def score_run(dataset: str, run: str, manifest: Manifest | None, split: str = "test") -> dict[str, Any]:
    """Scores of one run on ``split`` (generating what is missing): forced choice (with each image's outcome),
    attribute precision / recall, diversity, BLEU-1 and CIDEr; reused from ``runs/<run>.json`` while the
    run's checkpoint and the split's images are unchanged."""
    from stages.report.attributes import attribute_scores, attribute_truth
    from stages.report.diversity import diversity
    from stages.report.forced_choice import correct, forced_choice_scores, mask_following, run_choices
    from stages.synthetic.truth import ground_truth
    from stages.report.generate import checkpoint_fingerprint, generate_split, read_predictions, run_config
    from stages.report.references import references
    from stages.report.metrics import score

    truth = attribute_truth(dataset, split)
    if truth is None:
        raise ValueError(f"the study needs a synthetic dataset with ground truth; '{dataset}' has none")
    cache = study_dir(dataset) / "runs" / f"{run}.json"
    summary = generate_split(dataset, run, manifest, split, progress=False)
    captions = {i: c for i, c in read_predictions(summary.directory, split).items() if i in truth.values}
    key = hashlib.sha256(json.dumps([SCORES_VERSION, checkpoint_fingerprint(runs_dir(dataset) / run / "final"), split,
                                     sorted(captions.items())]).encode()).hexdigest()[:16]
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    if cached.get("key") == key:
        return cached
    choices, _ = run_choices(dataset, run, manifest, split, set(captions))
    forced = forced_choice_scores(choices, truth.values)
    following = None
    if run_config(runs_dir(dataset) / run).get("fusion") == "cross_attention":
        moved, _ = run_choices(dataset, run, manifest, split, set(captions), source="moved")
        following = mask_following(moved, ground_truth(dataset))
    refs = {i: r for i, r in references(dataset, split).items() if i in captions}
    metrics, _, _ = score(captions, refs, progress=False)
    result = {"key": key, **metrics, **diversity(captions),
              **attribute_scores(captions, truth.values), "forced_choice": forced["accuracy"],
              "global_forced_choice": forced["global_accuracy"], "forced_per_attribute": forced["per_attribute"],
              "forced_correct": correct(choices, truth.values), "mask_following": following,
              "mask_following_rate": following["rate"] if following else None}
    write_json_atomic(cache, result)
    return result


def outcomes(results: dict[str, list[dict[str, Any]]]) -> tuple[list[str], dict[str, np.ndarray]]:
    """(image ids, arm -> [seeds, images] forced-choice outcomes) over the images every run scored."""
    ids = sorted(set.intersection(*(set(r["forced_correct"]) for runs in results.values() for r in runs)))
    return ids, {arm: np.array([[r["forced_correct"][i] for i in ids] for r in runs]) for arm, runs in results.items()}


def seed_mean_following(following: list[dict[str, Any]]) -> dict[str, Any]:
    """Seed means of ``forced_choice.mask_following`` results: rate, stayed, chance, and each attribute's."""
    means = {k: statistics.fmean(f[k] for f in following) for k in ("rate", "stayed", "chance")}
    keys = [k for k in SUBJECT_ATTRIBUTES if all(k in f["per_attribute"] for f in following)]  # counted in every seed
    return {**means, "per_attribute": {k: {m: statistics.fmean(f["per_attribute"][k][m] for f in following)
                                           for m in ("rate", "stayed", "chance")} for k in keys}}


def summarise(results: dict[str, list[dict[str, Any]]], seeds: list[int], generator_version: int,
              chosen: dict[str, Any], probe: dict[str, Any] | None = None) -> dict[str, Any]:
    """summary.json: per arm the seed means, the paired contrasts, the EAT's share of the true masks' gain, and
    ``probe`` (stages/report/feature_probe.py: what the base's tokens hold) when given."""
    from stages.report.paired import paired_contrast, share_recovered

    ids, outcome = outcomes(results)
    arms = {}
    for arm, runs in results.items():
        per_attribute = {k: statistics.fmean(r["forced_per_attribute"][k] for r in runs)
                         for k in runs[0]["forced_per_attribute"]}
        following = [r["mask_following"] for r in runs if r.get("mask_following")]
        arms[arm] = {"forced_choice_accuracy": statistics.fmean(r["forced_choice"] for r in runs),
                     "global_forced_choice": statistics.fmean(r["global_forced_choice"] for r in runs),
                     "per_attribute": per_attribute,
                     "mask_following": seed_mean_following(following) if following else None,
                     "attr_precision": statistics.fmean(r["macro_precision"] for r in runs),
                     "attr_recall": statistics.fmean(r["macro_recall"] for r in runs),
                     "distinct": statistics.fmean(r["distinct"] for r in runs),
                     "per_seed_forced_choice": [r["forced_choice"] for r in runs]}
    contrasts = {}
    for name, (a, b) in CONTRASTS.items():
        if a in outcome and b in outcome:
            c = paired_contrast(outcome[a], outcome[b])
            contrasts[name] = {"diff": c.diff, "ci95": list(c.ci95), "p": c.p}
    recovery = None
    if all(arm in outcome for arm in ("eat", "uniform", "truth")):
        share, ci = share_recovered(outcome["eat"], outcome["uniform"], outcome["truth"])
        recovery = {"share": share, "ci95": list(ci)}
    truth_following = arms.get("truth", {}).get("mask_following")
    return {"generator_version": generator_version, "test_images": len(ids), "seeds": seeds, "arms": arms,
            "contrasts": contrasts, "eat_recovery": recovery,
            "mask_following": {"truth": truth_following["rate"], "chance": truth_following["chance"],
                               "stayed": truth_following["stayed"],
                               "per_attribute": truth_following["per_attribute"]} if truth_following else None,
            "feature_probe": probe, "chosen_on_validation": chosen}


def to_markdown(results: dict[str, list[dict[str, Any]]], summary: dict[str, Any], dataset: str) -> str:
    labels = {a.name: a.label for a in ARMS}
    seeds = len(summary["seeds"])
    head = ["Arm"] + [h for h, _ in COLUMNS]
    lines = [f"### Saliency study on {dataset} ({summary['test_images']} test images, mean ± sd over {seeds} seeds)",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, runs in results.items():
        cells = []
        for _, key in COLUMNS:
            values = [float(r[key]) for r in runs if r.get(key) is not None]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.3f} ± {sd:.3f}" if values else "—")
        lines.append("| " + " | ".join([f"{labels[arm]} ({arm})", *cells]) + " |")
    lines += ["", "| Contrast (forced choice, paired over images x seeds) | Difference | 95 % CI | p |",
              "|---|---|---|---|"]
    for name, c in summary["contrasts"].items():
        lines.append(f"| {name.replace('_vs_', ' vs ')} | {c['diff']:+.3f} | [{c['ci95'][0]:+.3f}, "
                     f"{c['ci95'][1]:+.3f}] | {c['p']:.3g} |")
    gain = summary["contrasts"].get("truth_vs_uniform")
    if summary["eat_recovery"] and gain and gain["ci95"][0] > 0:
        r = summary["eat_recovery"]
        lines += ["", f"EAT maps recover {r['share']:.0%} of the true masks' gain over uniform maps "
                      f"(95 % CI [{r['ci95'][0]:.0%}, {r['ci95'][1]:.0%}])."]
    elif gain:
        lines += ["", "The true masks gain nothing over uniform maps that the CI can tell from 0, so there is no "
                      "gain for the EAT's maps to recover (summary.json keeps the ratio and its CI)."]
    chosen = summary["chosen_on_validation"]
    tried = ", ".join(f"{setting}: {acc:.3f}" for setting, acc in chosen["validation_forced_choice"].items())
    following = summary["mask_following"]
    if following:
        lines += ["", f"Mask following (true-mask arm): with the true mask moved onto another subject, "
                      f"{following['truth']:.0%} of the choices describe that subject (a random subject: "
                      f"{following['chance']:.0%}); {following['stayed']:.0%} still describe the aesthetic one. Per "
                      "attribute (follows / stays / random subject): " + ", ".join(
                          f"{k} {f['rate']:.0%} / {f['stayed']:.0%} / {f['chance']:.0%}"
                          for k, f in following["per_attribute"].items()) + "."]
    probe = summary.get("feature_probe")
    if probe:
        cells = {p: ", ".join(f"{k} {v:.2f}" for k, v in probe["per_attribute"][p].items()) for p in probe["mean"]}
        lines += ["", f"What the base's tokens hold (a linear probe fit on {probe['train_images']} train images, "
                      f"scored on the {probe['test_images']} test images): pooled by the true mask "
                      f"{probe['mean']['true_mask']:.3f} ({cells['true_mask']}), evenly {probe['mean']['even']:.3f} "
                      f"({cells['even']}), over the wrong subject {probe['mean']['other_subject']:.3f}; always "
                      "the majority value: " + ", ".join(f"{k} {v:.2f}" for k, v in probe["majority"].items()) + "."]
    lines += ["", f"Forced choice: the share of the aesthetic subject's attributes whose true value the model finds "
                  f"likeliest to say (chance {CHANCE:.3f}); global: horizon and noise. Same data, schedule and base "
                  f"for every arm; only the fusion and the maps differ. {chosen['what']} chosen on the validation "
                  f"split ({chosen['by']}: {tried}), never on the test split."]
    return "\n".join(lines) + "\n"


def to_csv(results: dict[str, list[dict[str, Any]]], seeds: list[int]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["arm", "seed"] + [h for h, _ in COLUMNS])
    for arm, runs in results.items():
        for seed, r in zip(seeds, runs):
            writer.writerow([arm, seed] + ["" if r.get(k) is None else repr(float(r[k])) for _, k in COLUMNS])
    return buf.getvalue()


def plot(summary: dict[str, Any], path: Path, title: str) -> None:
    """Forced-choice accuracy per arm (each seed a dot, chance a line) and the contrasts with their CIs (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=110, gridspec_kw={"width_ratios": [1.2, 1]})
    arms = list(summary["arms"])
    for x, arm in enumerate(arms):
        per_seed = summary["arms"][arm]["per_seed_forced_choice"]
        left.bar(x, statistics.fmean(per_seed), 0.6, color="#8fb3d9")
        left.plot([x] * len(per_seed), per_seed, "k.", alpha=0.6)
    left.axhline(CHANCE, color="grey", linestyle="--", linewidth=1, label="chance")
    left.set_xticks(range(len(arms)), arms)
    left.set_ylabel("forced-choice accuracy (test)")
    left.set_ylim(0, 1)
    left.legend(frameon=False)
    names = list(summary["contrasts"])
    for y, name in enumerate(names):
        c = summary["contrasts"][name]
        right.errorbar(c["diff"], y, xerr=[[c["diff"] - c["ci95"][0]], [c["ci95"][1] - c["diff"]]], fmt="o",
                       color="#1f4e79", capsize=3)
    right.axvline(0, color="grey", linewidth=1)
    right.set_yticks(range(len(names)), [n.replace("_vs_", " vs ") for n in names])
    right.set_xlabel("paired difference, 95 % CI")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def write_study(dataset: str, results: dict[str, list[dict[str, Any]]], seeds: list[int], generator_version: int,
                chosen: dict[str, Any], probe: dict[str, Any] | None = None) -> Path:
    """summary.json, study.md, study.csv and study.png under ``reports/<dataset>/study/``; returns study.md."""
    out = study_dir(dataset)
    summary = summarise(results, seeds, generator_version, chosen, probe)
    write_json_atomic(out / "summary.json", summary)
    markdown = to_markdown(results, summary, dataset)
    write_bytes_atomic(out / "study.md", markdown.encode())
    write_bytes_atomic(out / "study.csv", to_csv(results, seeds).encode())
    plot(summary, out / "study.png", f"{dataset}: {summary['test_images']} test images x {len(seeds)} seeds per arm")
    return out / "study.md"
