"""The ablation study's aggregation, table and plot (the runs themselves are ordinary fine-tunes)."""
from __future__ import annotations

import statistics

import pytest
from PIL import Image

from stages.report import study


def _result(b1: float, p: float) -> dict:
    return {"Bleu_1": b1, "METEOR": 0.1, "ROUGE_L": 0.2, "CIDEr": 0.3, "macro_precision": p, "macro_recall": 0.4,
            "distinct": 0.5}


def test_mean_and_sd_over_seeds_table_and_plot(isolated_work) -> None:
    results = {"IASC + EAT maps": [_result(0.40, 0.70), _result(0.44, 0.80), _result(0.42, 0.75)],
               "no IASC": [_result(0.30, 0.50)]}
    stats = study.aggregate(results)
    assert stats["IASC + EAT maps"]["Bleu_1"] == pytest.approx((0.42, statistics.stdev([0.40, 0.44, 0.42])))
    assert stats["no IASC"]["macro_precision"] == (0.5, 0.0)  # one seed: no spread
    md = study.write_study("demo", results, [0, 1, 2])
    text = md.read_text()
    assert "| IASC + EAT maps | 0.420 ± 0.020 |" in text and "mean ± sd over 3 seeds" in text
    csv_rows = (md.parent / "study.csv").read_text().splitlines()
    assert csv_rows[0].startswith("variant,seed,B1") and len(csv_rows) == 1 + 4
    with Image.open(md.parent / "study.png") as img:
        assert img.format == "PNG" and img.width > 600


def test_run_names_are_distinct_per_variant_and_seed() -> None:
    names = {study.run_name(v, s) for v in study.VARIANTS for s in range(3)}
    assert len(names) == len(study.VARIANTS) * 3 and all(n.startswith("study-") for n in names)
