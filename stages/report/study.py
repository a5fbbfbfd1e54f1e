"""The ablation study by ground truth: fine-tuning variants x seeds, scored on the test split, mean ± sd.

Variants (``VARIANTS``): IASC on the EAT's maps (the method), without IASC (fusion none), IASC on uniform
maps (the architecture without saliency information) and IASC on the synthetic corpus's true aesthetic
masks (an upper bound for the saliency stage). Every run is an ordinary fine-tuning run; this module scores
one run (caption metrics, ground-truth attributes, diversity) and aggregates, tabulates and plots them into
``reports/<dataset>/study/`` (``study.md``, ``study.csv``, ``study.png``, ``runs/<run>.json``).
"""
from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.manifest import Manifest
from pipeline.paths import study_dir
from stages.report.metrics import METRIC_HEADERS
from storage.atomic import write_bytes_atomic


@dataclass(frozen=True)
class Variant:
    name: str
    fusion: str  # cross_attention | none
    saliency: str  # eat | uniform | truth (stages/finetune/saliency_source.py)


VARIANTS = (
    Variant("IASC + EAT maps", "cross_attention", "eat"),
    Variant("no IASC", "none", "eat"),
    Variant("IASC + uniform maps", "cross_attention", "uniform"),
    Variant("IASC + true masks", "cross_attention", "truth"),
)
# (header, key) of the study table and plot: caption metrics, ground-truth attributes, diversity
COLUMNS = tuple((METRIC_HEADERS[k], k) for k in ("Bleu_1", "METEOR", "ROUGE_L", "CIDEr")) + (
    ("Attr P", "macro_precision"), ("Attr R", "macro_recall"), ("Distinct", "distinct"))


def run_name(variant: Variant, seed: int) -> str:
    return "study-" + variant.name.lower().replace(" + ", "-").replace(" ", "-") + f"-s{seed}"


def score_run(dataset: str, run: str, manifest: Manifest | None, split: str = "test") -> dict[str, Any]:
    """Generate (what is missing) and score one run: caption metrics, attribute P / R, diversity."""
    from stages.synthetic.truth import ground_truth
    from stages.report.attributes import attribute_scores
    from stages.report.references import references
    from stages.report.diversity import diversity
    from stages.report.generate import generate_split, read_predictions
    from stages.report.metrics import score_to_file

    summary = generate_split(dataset, run, manifest, split, progress=False)
    refs = references(dataset, split)
    captions = {i: c for i, c in read_predictions(summary.directory, split).items() if i in refs}
    metrics, _ = score_to_file(study_dir(dataset) / "runs" / f"{run}.json", captions, refs, progress=False)
    result = {**metrics, **diversity(captions)}
    truth = ground_truth(dataset)
    if truth is not None:
        result.update(attribute_scores(captions, {i: truth[i]["attributes"] for i in captions}))
    return result


def aggregate(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, tuple[float, float]]]:
    """variant -> key -> (mean, sd over seeds; sd 0 for one seed)."""
    out = {}
    for name, runs in results.items():
        out[name] = {}
        for _, key in COLUMNS:
            values = [float(r[key]) for r in runs if r.get(key) is not None]
            if values:
                out[name][key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return out


def to_markdown(stats: dict[str, dict[str, tuple[float, float]]], dataset: str, seeds: int) -> str:
    head = ["Variant"] + [h for h, _ in COLUMNS]
    lines = [f"### Ablation study on {dataset} (test split, mean ± sd over {seeds} seeds)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, values in stats.items():
        cells = [f"{values[k][0]:.3f} ± {values[k][1]:.3f}" if k in values else "—" for _, k in COLUMNS]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    lines += ["", "B1 / M / R / C: BLEU-1, METEOR, ROUGE-L, CIDEr against the references; Attr P / R: macro attribute "
              "precision / recall against the true attributes; Distinct: share of distinct critiques. Same data, "
              "schedule and base for every variant; only the fusion and the saliency maps differ."]
    return "\n".join(lines) + "\n"


def to_csv(results: dict[str, list[dict[str, Any]]], seeds: list[int]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["variant", "seed"] + [h for h, _ in COLUMNS])
    for name, runs in results.items():
        for seed, r in zip(seeds, runs):
            writer.writerow([name, seed] + ["" if r.get(k) is None else repr(float(r[k])) for _, k in COLUMNS])
    return buf.getvalue()


def plot(stats: dict[str, dict[str, tuple[float, float]]], path: Path, title: str) -> None:
    """One bar group per variant, one bar per column, sd as error bars (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(stats)
    width = 0.8 / len(COLUMNS)
    fig, ax = plt.subplots(figsize=(10, 4.2), dpi=110)
    for j, (header, key) in enumerate(COLUMNS):
        xs = [i + (j - (len(COLUMNS) - 1) / 2) * width for i in range(len(names))]
        means = [stats[n].get(key, (0.0, 0.0))[0] for n in names]
        sds = [stats[n].get(key, (0.0, 0.0))[1] for n in names]
        ax.bar(xs, means, width, yerr=sds, capsize=2, label=header)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score (mean ± sd over seeds)")
    ax.set_title(title)
    ax.legend(ncol=len(COLUMNS), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def write_study(dataset: str, results: dict[str, list[dict[str, Any]]], seeds: list[int]) -> Path:
    """study.md / study.csv / study.png under ``reports/<dataset>/study/``; returns the Markdown path."""
    out = study_dir(dataset)
    stats = aggregate(results)
    markdown = to_markdown(stats, dataset, len(seeds))
    write_bytes_atomic(out / "study.md", markdown.encode())
    write_bytes_atomic(out / "study.csv", to_csv(results, seeds).encode())
    plot(stats, out / "study.png", f"{dataset}: fine-tuning variants, {len(seeds)} seeds each")
    return out / "study.md"
