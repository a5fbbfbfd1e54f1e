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
UNPLACED_CONTRASTS = ("truth_vs_uniform",)  # also on exposure, colour and focus alone (a mask's place gives placement)
# (header, key) of the study table and plot, mean ± sd over seeds
COLUMNS = (("Forced choice", "forced_choice"), ("Follows moved mask", "mask_following_rate"),
           ("Forced choice, global", "global_forced_choice"), ("Attr P", "macro_precision"),
           ("Attr R", "macro_recall"), ("Distinct", "distinct"), ("B1", "Bleu_1"), ("CIDEr", "CIDEr"))
PROBE_LABELS = {"true_mask": "pooled by the true mask", "even": "evenly pooled", "other_subject": "over another subject",
                "all_tokens": "all tokens"}
SCORES_VERSION = 3  # of what score_run computes (3: centred on validation, paired mask following, unplaced outcomes)
CHANCE = statistics.fmean(1 / len(ATTRIBUTES[k]) for k in SUBJECT_ATTRIBUTES)  # forced choice, aesthetic subject


def run_name(arm: Arm, seed: int) -> str:
    return f"study-{arm.name}-s{seed}"


def score_run(dataset: str, run: str, manifest: Manifest | None, split: str = "test",
              checkpoint: str = "final") -> dict[str, Any]:
    """Scores of one run's ``checkpoint`` on ``split`` (generating what is missing): forced choice (with each
    image's outcome, also over the unplaced attributes), mask following, attribute precision / recall, diversity,
    BLEU-1 and CIDEr; reused from ``runs/<run>.json`` while the checkpoint and the split's images are unchanged."""
    from stages.report.attributes import attribute_scores, attribute_truth
    from stages.report.diversity import diversity
    from stages.report.forced_choice import UNPLACED, correct, forced_choice_scores, mask_following, run_choices
    from stages.synthetic.truth import ground_truth
    from stages.report.generate import checkpoint_fingerprint, generate_split, read_predictions, run_config
    from stages.report.references import references
    from stages.report.metrics import score

    truth = attribute_truth(dataset, split)
    if truth is None:
        raise ValueError(f"the study needs a synthetic dataset with ground truth; '{dataset}' has none")
    cache = study_dir(dataset) / "runs" / f"{run}.json"
    summary = generate_split(dataset, run, manifest, split, checkpoint, progress=False)
    captions = {i: c for i, c in read_predictions(summary.directory, split).items() if i in truth.values}
    key = hashlib.sha256(json.dumps([SCORES_VERSION, checkpoint_fingerprint(runs_dir(dataset) / run / checkpoint),
                                     split, sorted(captions.items())]).encode()).hexdigest()[:16]
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    if cached.get("key") == key:
        return cached
    sources = (None, "moved") if run_config(runs_dir(dataset) / run).get("fusion") == "cross_attention" else (None,)
    (choices, *moved), _ = run_choices(dataset, run, manifest, split, set(captions), checkpoint, sources=sources)
    forced = forced_choice_scores(choices, truth.values)
    following = mask_following(moved[0], choices, ground_truth(dataset)) if moved else None
    refs = {i: r for i, r in references(dataset, split).items() if i in captions}
    metrics, _, _ = score(captions, refs, progress=False)
    result = {"key": key, **metrics, **diversity(captions),
              **attribute_scores(captions, truth.values), "forced_choice": forced["accuracy"],
              "global_forced_choice": forced["global_accuracy"], "forced_per_attribute": forced["per_attribute"],
              "forced_correct": correct(choices, truth.values),
              "forced_correct_unplaced": correct(choices, truth.values, UNPLACED), "mask_following": following,
              "mask_following_rate": following["rate"] if following else None}
    write_json_atomic(cache, result)
    return result


def validation_accuracy(dataset: str, run: str, manifest: Manifest | None, checkpoint: str) -> float:
    """Forced-choice accuracy of a run's ``checkpoint`` on the validation split (a point of the study's learning
    curve), kept in ``runs/<run>.curve.json`` while that checkpoint is unchanged."""
    from stages.report.attributes import attribute_truth
    from stages.report.forced_choice import forced_choice_scores, run_choices
    from stages.report.generate import checkpoint_fingerprint

    cache = study_dir(dataset) / "runs" / f"{run}.curve.json"
    key = hashlib.sha256(json.dumps([SCORES_VERSION, checkpoint_fingerprint(runs_dir(dataset) / run / checkpoint)])
                         .encode()).hexdigest()[:16]
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    if cached.get(checkpoint, {}).get("key") != key:
        (choices,), _ = run_choices(dataset, run, manifest, "validation", checkpoint=checkpoint)
        accuracy = forced_choice_scores(choices, attribute_truth(dataset, "validation").values)["accuracy"]
        cached = {**cached, checkpoint: {"key": key, "accuracy": accuracy}}
        write_json_atomic(cache, cached)
    return cached[checkpoint]["accuracy"]


def outcomes(results: dict[str, list[dict[str, Any]]],
             key: str = "forced_correct") -> tuple[list[str], dict[str, np.ndarray]]:
    """(image ids, arm -> [seeds, images] per-image outcomes ``key``) over the images every run scored."""
    ids = sorted(set.intersection(*(set(r[key]) for runs in results.values() for r in runs)))
    return ids, {arm: np.array([[r[key][i] for i in ids] for r in runs]) for arm, runs in results.items()}


def following_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mask following of one arm over its seeds (``forced_choice.mask_following`` per run): ``rate`` (moved-mask
    choices naming the moved-to subject's value) with its two-way bootstrap 95 % CI over seeds and images, the
    ``baseline`` (the same runs' own-mask choices naming that value: what ignoring the map scores), the paired
    per-image ``difference`` (rate - baseline, stages/report/paired.py), ``stayed`` and the seed means per
    attribute."""
    from stages.report.paired import RESAMPLES, paired_contrast, two_way_bootstrap

    following = [r["mask_following"] for r in runs]
    ids = sorted(set.intersection(*(set(f["per_image"]) for f in following)))
    counts = np.array([[f["per_image"][i] for i in ids] for f in following], dtype=np.float64)  # [S, N, 3]
    followed, baseline, counted = counts[..., 0], counts[..., 1], counts[..., 2]
    ratio = two_way_bootstrap(followed, RESAMPLES, 0) / two_way_bootstrap(counted, RESAMPLES, 0)  # same draws
    lo, hi = np.quantile(ratio, [0.025, 0.975])
    difference = paired_contrast(followed / counted, baseline / counted)
    keys = [k for k in SUBJECT_ATTRIBUTES if all(k in f["per_attribute"] for f in following)]  # counted in every seed
    return {"rate": float(followed.sum() / counted.sum()), "ci95": [float(lo), float(hi)],
            "baseline": float(baseline.sum() / counted.sum()),
            "difference": {"diff": difference.diff, "ci95": list(difference.ci95), "p": difference.p},
            "stayed": statistics.fmean(f["stayed"] for f in following), "images": len(ids),
            "per_attribute": {k: {m: statistics.fmean(f["per_attribute"][k][m] for f in following)
                                  for m in ("rate", "baseline", "stayed")} for k in keys}}


P_NOTE = ("p: a two-sided paired permutation test over images, each image's seed-averaged outcome: conditional on "
          "the trained models (it asks whether these models differ on the population of images; retraining is what "
          "the CI, over seeds and images, asks about) and never below 1/{n} ({resamples} resamples).")


def summarise(results: dict[str, list[dict[str, Any]]], seeds: list[int], generator_version: int,
              chosen: dict[str, Any], probe: dict[str, Any] | None = None,
              ladder: dict[str, Any] | None = None) -> dict[str, Any]:
    """summary.json: per arm the seed means, the paired contrasts (all four attributes; exposure, colour and focus
    alone), the EAT's share of the true masks' gain (null while that gain's CI includes 0), mask following, the
    ladder's rungs (``ladder``: base_reading, named_oracle, eat_subject_preference; stages/report/ladder.py) and
    ``probe`` (stages/report/feature_probe.py: what the base's tokens hold) when given."""
    from stages.report.paired import RESAMPLES, paired_contrast, share_recovered

    ids, outcome = outcomes(results)
    _, unplaced = outcomes(results, "forced_correct_unplaced")
    arms = {}
    for arm, runs in results.items():
        per_attribute = {k: statistics.fmean(r["forced_per_attribute"][k] for r in runs)
                         for k in runs[0]["forced_per_attribute"]}
        arms[arm] = {"forced_choice_accuracy": statistics.fmean(r["forced_choice"] for r in runs),
                     "global_forced_choice": statistics.fmean(r["global_forced_choice"] for r in runs),
                     "per_attribute": per_attribute,
                     "mask_following": following_summary(runs) if runs[0].get("mask_following") else None,
                     "attr_precision": statistics.fmean(r["macro_precision"] for r in runs),
                     "attr_recall": statistics.fmean(r["macro_recall"] for r in runs),
                     "distinct": statistics.fmean(r["distinct"] for r in runs),
                     "per_seed_forced_choice": [r["forced_choice"] for r in runs]}
    contrasts = {}
    for name, (a, b) in CONTRASTS.items():
        for suffix, table in (("", outcome), ("_unplaced", unplaced)):
            if a in table and b in table and (not suffix or name in UNPLACED_CONTRASTS):
                c = paired_contrast(table[a], table[b])
                contrasts[name + suffix] = {"diff": c.diff, "ci95": list(c.ci95), "p": c.p}
    recovery = None
    if all(arm in outcome for arm in ("eat", "uniform", "truth")):
        gain = contrasts["truth_vs_uniform"]
        if gain["ci95"][0] > 0:
            share, ci = share_recovered(outcome["eat"], outcome["uniform"], outcome["truth"])
            recovery = {"share": share, "ci95": list(ci)}
        else:
            recovery = {"share": None, "ci95": None, "why": "the true masks' gain over uniform maps has a 95 % CI "
                                                             "that includes 0: there is no gain to share"}
    truth_following = arms.get("truth", {}).get("mask_following")
    ladder = ladder or {}
    return {"generator_version": generator_version, "test_images": len(ids), "seeds": seeds,
            "base_reading": ladder.get("base_reading"), "named_oracle": ladder.get("named_oracle"),
            "eat_subject_preference": ladder.get("eat_subject_preference"), "ladder": ladder.get("details"),
            "arms": arms, "contrasts": contrasts, "eat_recovery": recovery,
            "mask_following": {"truth": truth_following} if truth_following else None,
            "notes": {"p": P_NOTE.format(n=RESAMPLES + 1, resamples=RESAMPLES)},
            "feature_probe": probe, "chosen_on_validation": chosen}


def ladder_lines(summary: dict[str, Any]) -> list[str]:
    """The rungs beneath the top line (stages/report/ladder.py), one table row each, where the summary has them."""
    rows = []
    reading = summary.get("base_reading")
    if reading:
        rows.append(("R1 reading: the base describes each subject (description accuracy)",
                     ", ".join(f"{k} {v:.2f}" for k, v in reading.items())))
    if summary.get("named_oracle") is not None:
        rows.append(("R2 naming: the base's forced choice with the aesthetic subject named",
                     f"{summary['named_oracle']:.3f}"))
    truth, gain = summary["arms"].get("truth"), summary["contrasts"].get("truth_vs_uniform")
    if truth and gain:
        unplaced = summary["contrasts"].get("truth_vs_uniform_unplaced")
        rows.append(("R3 selecting: IASC + true masks, forced choice; vs uniform maps",
                     f"{truth['forced_choice_accuracy']:.3f}; {gain['diff']:+.3f} [{gain['ci95'][0]:+.3f}, "
                     f"{gain['ci95'][1]:+.3f}]" + (f" (exposure, colour, focus alone {unplaced['diff']:+.3f} "
                                                   f"[{unplaced['ci95'][0]:+.3f}, {unplaced['ci95'][1]:+.3f}])"
                                                   if unplaced else "")))
    if summary.get("eat_subject_preference") is not None:
        rows.append(("R4 finding: the EAT's subject preference (1 = none)", f"{summary['eat_subject_preference']:.2f}"))
    if not rows:
        return []
    return ["| Rung | Measured (test split) |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows), ""]


def to_markdown(results: dict[str, list[dict[str, Any]]], summary: dict[str, Any], dataset: str) -> str:
    labels = {a.name: a.label for a in ARMS}
    seeds = len(summary["seeds"])
    head = ["Arm"] + [h for h, _ in COLUMNS]
    lines = [f"### Saliency study on {dataset} ({summary['test_images']} test images, mean ± sd over {seeds} seeds)",
             "", *ladder_lines(summary), "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
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
        label = name.replace("_vs_", " vs ").replace("_unplaced", " (exposure, colour, focus)")
        lines.append(f"| {label} | {c['diff']:+.3f} | [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] | {c['p']:.3g} |")
    lines += ["", summary["notes"]["p"]]
    recovery = summary["eat_recovery"]
    if recovery and recovery["share"] is not None:
        lines += ["", f"EAT maps recover {recovery['share']:.0%} of the true masks' gain over uniform maps "
                      f"(95 % CI [{recovery['ci95'][0]:.0%}, {recovery['ci95'][1]:.0%}])."]
    elif recovery:
        lines += ["", f"EAT maps' share of the true masks' gain: none to share ({recovery['why']})."]
    following = (summary["mask_following"] or {}).get("truth")
    if following:
        d = following["difference"]
        lines += ["", f"Mask following (true-mask arm): with the true mask moved onto another subject, "
                      f"{following['rate']:.0%} (95 % CI [{following['ci95'][0]:.0%}, {following['ci95'][1]:.0%}]) of "
                      f"the choices name that subject's value where it differs from the aesthetic subject's; the same "
                      f"runs' own-mask choices name it {following['baseline']:.0%} of the time (what ignoring the map "
                      f"scores): paired difference {d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]; "
                      f"{following['stayed']:.0%} still name the aesthetic subject's. Per attribute (follows / "
                      "baseline / stays): " + ", ".join(f"{k} {f['rate']:.0%} / {f['baseline']:.0%} / {f['stayed']:.0%}"
                                                        for k, f in following["per_attribute"].items()) + "."]
    probe = summary.get("feature_probe")
    if probe:
        cells = {p: ", ".join(f"{k} {v:.2f}" for k, v in probe["per_attribute"][p].items()) for p in probe["mean"]}
        lines += ["", f"What the base's tokens hold (a linear probe fit on {probe['train_images']} train images, its "
                      f"regularisation chosen on the validation split, scored on the {probe['test_images']} test "
                      "images): " + "; ".join(f"{PROBE_LABELS[p]} {probe['mean'][p]:.3f} ({cells[p]})"
                                              for p in probe["mean"])
                  + "; always the majority value: " + ", ".join(f"{k} {v:.2f}" for k, v in probe["majority"].items())
                  + "."]
    chosen = summary["chosen_on_validation"]
    curve = chosen["learning_curve"]
    steps = sorted({int(s) for c in curve.values() for s in c})
    lines += ["", f"Validation learning curve (forced choice of each arm's seed-0 run at its checkpoints; "
                  f"{chosen['schedule']}); every run is scored at step {chosen['step']}, the best mean over the arms:",
              "", "| Arm | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps),
              *(f"| {arm} | " + " | ".join(f"{c[s] if s in c else c[str(s)]:.3f}" for s in steps) + " |"
                for arm, c in curve.items())]
    lines += ["", f"Forced choice: the share of the aesthetic subject's attributes whose true value the model finds "
                  f"likeliest to say (chance {CHANCE:.3f}), centred on each run's validation split; global: horizon and "
                  f"noise. Same data, schedule and base for every arm; only the fusion and the maps differ. Nothing is "
                  f"chosen on the test split."]
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
                chosen: dict[str, Any], probe: dict[str, Any] | None = None,
                ladder: dict[str, Any] | None = None) -> Path:
    """summary.json, study.md, study.csv and study.png under ``reports/<dataset>/study/``; returns study.md."""
    out = study_dir(dataset)
    summary = summarise(results, seeds, generator_version, chosen, probe, ladder)
    write_json_atomic(out / "summary.json", summary)
    markdown = to_markdown(results, summary, dataset)
    write_bytes_atomic(out / "study.md", markdown.encode())
    write_bytes_atomic(out / "study.csv", to_csv(results, seeds).encode())
    plot(summary, out / "study.png", f"{dataset}: {summary['test_images']} test images x {len(seeds)} seeds per arm")
    return out / "study.md"
