"""Tables: packaged paper numbers equal ../shared's transcription; Markdown / CSV round-trip."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from stages.report import tables

OURS = {"Bleu_1": 0.5, "Bleu_2": 0.25, "Bleu_3": 0.125, "Bleu_4": 0.0625, "METEOR": 0.1, "ROUGE_L": 0.3,
        "CIDEr": 0.02, "SPICE": None, "SPICE_L": None, "Precision": None, "Recall": None,
        "distinct": 0.75, "distinct_1": 0.2, "distinct_2": 0.4, "mean_length": 12.25}
NOTES = {k: "SPICE needs the CoreNLP jars" for k in ("SPICE", "SPICE_L", "Precision", "Recall")}


def test_packaged_paper_tables_match_shared_copy(shared_dir: Path):
    shared = list(csv.DictReader((shared_dir / "data" / "paper_tables.csv").open()))
    for table in ("I", "II", "III"):
        for dataset in ("DPC2022", "PCCD", "RPCD"):
            expected = [r for r in shared if r["table"] == table and r["dataset"] == dataset]
            got = tables.paper_rows(table, dataset.lower())
            assert len(got) == len(expected) > 0
            for row, rec in zip(got, expected):
                for header, key in tables.COLUMNS:
                    col = tables.PAPER_CSV_COLUMNS.get(key, key)
                    assert row.values[key] == (float(rec[col]) if rec[col] else None)


def test_pccd_ours_row_is_the_published_one():
    """The paper's Table I PCCD row as printed in arXiv 2509.04378: B1 0.739, B4 0.111, M 0.143, R 0.363, C 0.054, S 0.054,
    S-L 0.241, Pre 0.298, Re 0.260."""
    (row,) = [r for r in tables.paper_rows("I", "pccd") if r.method.startswith("ASE-MLLM")]
    published = {"Bleu_1": 0.739, "Bleu_4": 0.111, "METEOR": 0.143, "ROUGE_L": 0.363, "CIDEr": 0.054,
                 "SPICE": 0.054, "SPICE_L": 0.241, "Precision": 0.298, "Recall": 0.260}
    assert {k: row.values[k] for k in published} == published


def parse_markdown_table(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("|") and not line.startswith("|---")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_table_one_markdown_and_csv(tmp_path):
    written = tables.write_tables(tmp_path, "PCCD", {"ours-run": OURS, "retrieval: consensus": OURS}, notes=NOTES)
    md = (tmp_path / "table.md").read_text()
    assert list(written.values()) == [md] and not (tmp_path / "ablation.md").exists()
    grid = parse_markdown_table(md)
    assert grid[0] == ["Method", "Source", "B1", "B2", "B3", "B4", "M", "R", "C", "S", "S-L", "Pre", "Re",
                       "Distinct", "D-1", "D-2", "Len"]
    assert len(grid) == 1 + len(tables.paper_rows("I", "PCCD")) + 2
    assert grid[-2][:4] == ["ours-run", "ours", "0.500", "0.250"] and grid[-2][-8:-4] == ["—"] * 4
    assert grid[-2][-4:] == ["0.750", "0.200", "0.400", "12.2"]  # diversity of ours
    assert all(r[-4:] == ["—"] * 4 for r in grid[1:] if r[1] == "paper")  # the paper reports none
    assert "— (S, S-L, Pre, Re): SPICE needs the CoreNLP jars" in md and "arXiv:2509.04378" in md
    rows = list(csv.DictReader(io.StringIO((tmp_path / "table.csv").read_text())))
    assert rows[-1]["method"] == "retrieval: consensus" and rows[-1]["S"] == ""
    assert [float(rows[-1][h]) for h, k in tables.COLUMNS[:7]] == [OURS[k] for _, k in tables.COLUMNS[:7]]


def test_ablation_table_only_with_two_conditions(tmp_path):
    tables.write_tables(tmp_path, "rpcd", {"x": OURS}, runs={(True, True): OURS})
    assert not (tmp_path / "ablation.md").exists()
    runs = {(True, True): OURS, (False, False): {**OURS, "Bleu_1": 0.1}}
    written = tables.write_tables(tmp_path, "rpcd", {"x": OURS}, runs=runs, notes=NOTES)
    grid = parse_markdown_table((tmp_path / "ablation.md").read_text())
    ours = [r for r in grid if r[1] == "ours"]
    assert [r[0] for r in ours] == ["pretrained (no FT, no IASC)", "FT + IASC"] and ours[0][2] == "0.100"
    assert len([r for r in grid if r[1] == "paper"]) == 3 and len(written) == 2


@pytest.mark.parametrize("dataset", ["demo", "ava_captions"])
def test_dataset_without_published_numbers(tmp_path, dataset):
    tables.write_tables(tmp_path, dataset, {"run": OURS})
    md = (tmp_path / "table.md").read_text()
    assert f"reports no results for dataset '{dataset}'" in md and len(parse_markdown_table(md)) == 2
    assert "— (S, S-L, Pre, Re): not computed" in md
