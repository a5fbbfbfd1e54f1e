"""Result tables in the paper's layouts, our rows beside its published ones, as Markdown and CSV.

Table I: one row per method, columns B1 B2 B3 B4 M R C S S-L Pre Re. Table II (III for the
Qwen-VL-Chat base): the ablation with / without fine-tuning (FT) and IASC. Our Table III rows come
from the Qwen2.5-VL family (Qwen-VL-Chat is remote code only) and are labelled with their base. The
paper's numbers ship as package data (``data/paper_tables.csv``, see ``data/README.md``).
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from stages.report.metrics import METRIC_COLUMNS
from storage.atomic import write_bytes_atomic

COLUMNS = METRIC_COLUMNS  # (header in the paper's layout, metric key)
# Output diversity (stages/report/diversity.py) beside every row of ours; the paper reports none.
DIVERSITY_COLUMNS = (("Distinct", "distinct"), ("D-1", "distinct_1"), ("D-2", "distinct_2"), ("Len", "mean_length"))
TABLE_COLUMNS = COLUMNS + DIVERSITY_COLUMNS
DIVERSITY_NOTE = ("Distinct: share of images with a critique no other image got; D-1 / D-2: distinct unigrams / "
                  "bigrams over all; Len: mean words. A constant output has Distinct = 1/N. The paper reports none.")
PAPER_CSV_COLUMNS = {"Bleu_1": "B1", "Bleu_2": "B2", "Bleu_3": "B3", "Bleu_4": "B4"}  # others share our key
CITATION = ("Tao, Huang, Xu, Shao: Aesthetic Image Captioning with Saliency Enhanced MLLMs, "
            "arXiv:2509.04378 (2025)")
# Ablation conditions (fine-tuned, IASC) -> the paper's row labels in Tables II / III
CONDITIONS = {
    (False, False): "pretrained (no FT, no IASC)",
    (False, True): "IASC, no FT",
    (True, False): "FT, no IASC",
    (True, True): "FT + IASC",
}
ABLATION_BASE = {"II": "InternVL2-8B", "III": "Qwen-VL-Chat"}


@dataclass(frozen=True)
class Row:
    method: str
    source: str  # "paper" or "ours"
    values: dict[str, float | None]  # metric key -> value (None: not available)


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def paper_rows(table: str, dataset: str) -> list[Row]:
    """The published rows of Table ``table`` ("I", "II", "III") for ``dataset`` (any spelling: pccd, DPC-2022)."""
    text = resources.files("stages.report").joinpath("data/paper_tables.csv").read_text(encoding="utf-8")
    rows = []
    for rec in csv.DictReader(io.StringIO(text)):
        if rec["table"] != table or _norm(rec["dataset"]) != _norm(dataset):
            continue
        values = {key: float(rec[PAPER_CSV_COLUMNS.get(key, key)]) if rec[PAPER_CSV_COLUMNS.get(key, key)] else None
                  for _, key in COLUMNS}
        values.update({key: None for _, key in DIVERSITY_COLUMNS})
        method = rec["description"] if table == "I" else f"{rec['method']} ({rec['description']})"
        rows.append(Row(method, "paper", values))
    return rows


def _ours(name: str, metrics: dict[str, float | None]) -> Row:
    return Row(name, "ours", {key: metrics.get(key) for _, key in TABLE_COLUMNS})


def table_one(dataset: str, ours: dict[str, dict[str, float | None]]) -> list[Row]:
    """Table I: the paper's rows for ``dataset`` then ours (run or baseline name -> metrics)."""
    return paper_rows("I", dataset) + [_ours(name, m) for name, m in ours.items()]


def ablation(dataset: str, runs: dict[tuple[bool, bool], dict[str, float | None]], paper_table: str = "II",
             base: str | None = None) -> list[Row]:
    """Table II layout: paper rows, then ours per (fine-tuned, IASC) condition present in ``runs``; with
    ``base`` (our base when it differs from the paper's) our rows name it."""
    ordered = [c for c in CONDITIONS if c in runs]
    suffix = f" ({base})" if base else ""
    return paper_rows(paper_table, dataset) + [_ours(CONDITIONS[c] + suffix, runs[c]) for c in ordered]


def _fmt(value: float | None, key: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:.1f}" if key == "mean_length" else f"{value:.3f}"


def to_markdown(rows: list[Row], title: str, dataset: str, notes: dict[str, str] | None = None,
                partial: dict[str, str] | None = None) -> str:
    """A Markdown table; "—" marks values not available, explained under the table; ``partial`` (row ->
    "N of M images") names the rows scored on part of the split."""
    head = ["Method", "Source"] + [h for h, _ in TABLE_COLUMNS]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([r.method.replace("|", "/"), r.source] + [_fmt(r.values[k], k) for _, k in TABLE_COLUMNS])
              + " |" for r in rows]
    lines.append("")
    if any(r.source == "paper" for r in rows):
        lines.append(f"Paper rows: {CITATION}.")
    else:
        lines.append(f"The paper reports no results for dataset '{dataset}'.")
    lines.append(DIVERSITY_NOTE)
    missing = sorted({k for r in rows if r.source == "ours" for _, k in COLUMNS if r.values[k] is None})
    for reason in sorted({(notes or {}).get(k, "not computed") for k in missing}):
        keys = ", ".join(h for h, k in COLUMNS if k in missing and (notes or {}).get(k, "not computed") == reason)
        lines.append(f"— ({keys}): {reason}")
    for row, cover in (partial or {}).items():
        lines.append(f"Partial: {row} scored on {cover} of the split only (--allow-partial).")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[Row]) -> str:
    """CSV with the same columns; values not available are empty cells."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "source"] + [h for h, _ in TABLE_COLUMNS])
    for r in rows:
        writer.writerow([r.method, r.source] + ["" if r.values[k] is None else repr(r.values[k]) for _, k in TABLE_COLUMNS])
    return buf.getvalue()


def write_tables(
    out_dir: Path,
    dataset: str,
    ours: dict[str, dict[str, float | None]],
    runs: dict[tuple[bool, bool], dict[str, float | None]] | None = None,
    notes: dict[str, str] | None = None,
    paper_table: str = "II",
    base: str | None = None,
    partial: dict[str, str] | None = None,
) -> dict[str, str]:
    """Write table.md / table.csv (Table I) and, with two or more ablation conditions, ablation.md /
    ablation.csv (Table ``paper_table``; ``base``: our base when it is not the paper's; ``partial``: rows scored
    on part of the split). Returns {title: markdown} for the HTML report."""
    written = {}
    rows = table_one(dataset, ours)
    title = f"Table I layout: {dataset} test split"
    written[title] = to_markdown(rows, title, dataset, notes, partial)
    write_bytes_atomic(out_dir / "table.md", written[title].encode())
    write_bytes_atomic(out_dir / "table.csv", to_csv(rows).encode())
    if runs and len(runs) >= 2:
        rows = ablation(dataset, runs, paper_table, base)
        paper_base = ABLATION_BASE[paper_table]
        title = (f"Table {paper_table} layout: ablation on {dataset} ({paper_base} in the paper)" if not base else
                 f"Table {paper_table} layout: ablation on {dataset} (ours on {base}; the paper's rows on "
                 f"{paper_base}, a different base)")
        written[title] = to_markdown(rows, title, dataset, notes, partial)
        write_bytes_atomic(out_dir / "ablation.md", written[title].encode())
        write_bytes_atomic(out_dir / "ablation.csv", to_csv(rows).encode())
    return written


def attribute_columns() -> list[tuple[str, str]]:
    """(header, key) of the ground-truth attribute table: macro precision / recall, then per attribute."""
    from stages.synthetic.attributes import ATTRIBUTES

    per = [(f"{name} {h}", f"{k}_{name}") for name in ATTRIBUTES
           for h, k in (("P", "precision"), ("R", "recall"), ("κ", "kappa"))]
    return [("Forced choice", "forced_choice"), ("Follows moved mask", "mask_following"),
            ("Forced choice, global", "global_forced_choice"), ("Macro P", "macro_precision"),
            ("Macro R", "macro_recall"), ("Macro κ", "macro_kappa"), *per, ("Distinct", "distinct")]


ATTRIBUTE_NOTE = ("Forced choice: share of the aesthetic subject's four attributes (placement, exposure, colour, "
                  "focus) whose true value the model finds likeliest to say, given the image and its map (every "
                  "value's phrasings scored as the critique's opening sentence, centred over the split's images; for "
                  "the best constant, the training split's most frequent value; chance 0.375); global: the same for "
                  "horizon and noise. Follows moved mask: with the true mask moved onto another subject, the share of "
                  "those choices (where that subject differs) that describe it instead (a model that ignores its "
                  "map stays near the rate at which it happens to match; one that picks a random subject: about "
                  "0.45). "
                  "Attribute values each critique asserts, read with the corpus generator's phrase bank, against the "
                  "image's true attributes. P: correct assertions / assertions about that attribute (0 if never "
                  "mentioned); R: images whose true value is asserted / images; κ: Cohen's kappa of the asserted "
                  "against the true value over the images with exactly one assertion (0 for a critique that always "
                  "claims the same value; — where undefined). Best constant critique: chosen on the training split, "
                  "the same text for every image. Reference critique: each image's first reference (written from the "
                  "truth, so its precision is 1 by construction; its recall is what one human-style critique covers).")


def write_attribute_table(out_dir: Path, dataset: str, rows: dict[str, dict[str, float]], split: str = "test") -> str:
    """attributes.md / attributes.csv: the ground-truth attribute scores of every row; returns the Markdown."""
    columns = attribute_columns()
    title = f"Ground truth: attribute precision / recall on the {dataset} {split} split"
    head = ["Method"] + [h for h, _ in columns]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([name.replace("|", "/")] + [_fmt(m.get(k)) for _, k in columns]) + " |"
              for name, m in rows.items()]
    lines += ["", ATTRIBUTE_NOTE]
    markdown = "\n".join(lines) + "\n"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method"] + [h for h, _ in columns])
    for name, m in rows.items():
        writer.writerow([name] + ["" if m.get(k) is None else repr(m[k]) for _, k in columns])
    write_bytes_atomic(out_dir / "attributes.md", markdown.encode())
    write_bytes_atomic(out_dir / "attributes.csv", buf.getvalue().encode())
    return markdown
