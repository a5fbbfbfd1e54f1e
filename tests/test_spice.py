"""SPICE plumbing: jar discovery, the java command, output parsing and best-reference selection.

The official jar cannot run here (no CoreNLP 3.6.0 jars), so the parser is tested on hand-made
output in SPICE's documented format (a list of {"image_id", "scores": {"All": {"pr", "re", "f",
"fn", "fp", "tp", "numImages"}, "Relation": ..., ...}, optional "test_tuples" / "ref_tuples"}),
and the end-to-end path on a stand-in `java` that answers SpiceScorer calls in that format.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

from stages.report import metrics, spice


def entry(image_id: str, pr: float | str, re: float | str, f: float | str) -> dict:
    counts = {"tp": 1.0, "fp": 1.0, "fn": 1.0, "numImages": 1}
    other = {"pr": 0.0, "re": 0.0, "f": 0.0, **counts}
    return {
        "image_id": image_id,
        "scores": {"All": {"pr": pr, "re": re, "f": f, **counts}, "Relation": other, "Object": other,
                   "Attribute": other, "Color": other, "Count": other, "Size": other},
        "test_tuples": [{"tuple": ["photo"], "truth_value": True}],
        "ref_tuples": [{"tuple": ["photo"], "truth_value": True}],
    }


def test_paper_definition_on_documented_format():
    """SPICE-L, Precision and Recall are each the best over the single references, chosen separately
    (image a: F best on ref 1, precision best on ref 1, recall best on ref 2)."""
    candidates = {"a": "cand a", "b": "cand b"}
    references = {"a": ["r0", "r1", "r2"], "b": ["s0", "s1"]}
    raw = json.dumps([
        entry("a#all", 0.5, 0.25, 1 / 3), entry("a#0", 0.2, 0.1, 0.1333), entry("a#1", 0.6, 0.3, 0.4),
        entry("a#2", 0.1, 0.9, 0.18),
        # b: no candidate tuples -> SPICE writes NaN; ties between references keep the first
        entry("b#all", "NaN", 0.0, "NaN"), entry("b#0", 0.5, 0.5, 0.5), entry("b#1", 0.25, 1.0, 0.5),
    ]).replace('"NaN"', "NaN")  # SPICE (json-simple) writes a bare NaN token
    parsed = spice.parse_output(json.loads(raw))
    corpus, per_image = spice.select(parsed, candidates, references)
    assert per_image["a"] == {"SPICE": 1 / 3, "SPICE_L": 0.4, "Precision": 0.6, "Recall": 0.9,
                              "spice_best_reference": 1, "precision_best_reference": 1, "recall_best_reference": 2}
    assert per_image["b"] == {"SPICE": 0.0, "SPICE_L": 0.5, "Precision": 0.5, "Recall": 1.0,
                              "spice_best_reference": 0, "precision_best_reference": 0, "recall_best_reference": 1}
    assert corpus == pytest.approx({"SPICE": (1 / 3) / 2, "SPICE_L": 0.45, "Precision": 0.55, "Recall": 0.95})


def test_input_has_one_entry_per_image_and_per_single_reference():
    rows = spice.build_input({"x#1": "c"}, {"x#1": ["r0", "r1"]})
    assert [(r["image_id"], r["refs"]) for r in rows] == [("x#1#all", ["r0", "r1"]), ("x#1#0", ["r0"]), ("x#1#1", ["r1"])]
    assert all(r["test"] == "c" for r in rows)


def test_jar_discovery_order_and_reason(tmp_path, monkeypatch):
    monkeypatch.delenv(spice.ENV_LIB, raising=False)
    if spice.find_spice_lib().lib is None:
        reason = spice.find_spice_lib(tmp_path).reason
        assert str(tmp_path) in reason and "stanford-corenlp-3.6.0.jar" in reason and spice.ENV_LIB in reason
    for jar in spice.CORENLP_JARS:
        (tmp_path / jar).write_bytes(b"")
    assert spice.find_spice_lib(tmp_path).lib == tmp_path
    monkeypatch.setenv(spice.ENV_LIB, str(tmp_path))
    assert spice.find_spice_lib().lib == tmp_path


def test_no_cache_on_java_16_and_later(tmp_path):
    new = spice.spice_command(tmp_path, Path("in.json"), Path("out.json"), tmp_path / "cache", 17)
    old = spice.spice_command(tmp_path, Path("in.json"), Path("out.json"), tmp_path / "cache", 8)
    assert "-cache" not in new and old[old.index("-cache") + 1] == str(tmp_path / "cache")
    assert new[new.index("-cp") + 1].endswith(str(tmp_path / "*")) and "edu.anu.spice.SpiceScorer" in new


FAKE_JAVA = """#!{python}
# Stand-in java: SpiceScorer calls get SPICE-format output (F = word-overlap Dice); others run the real java.
import json, os, sys
args = sys.argv[1:]
if "edu.anu.spice.SpiceScorer" not in args:
    os.execv({java!r}, [{java!r}] + args)
rows = json.load(open(args[args.index("edu.anu.spice.SpiceScorer") + 1]))
with open({log!r}, "a") as log:
    log.write(json.dumps({{"args": args, "rows": rows}}) + "\\n")
out = []
for r in rows:
    t = set(r["test"].lower().split()); ref = set(" ".join(r["refs"]).lower().split())
    tp = len(t & ref); pr = tp / len(t); re = tp / len(ref)
    f = 2 * pr * re / (pr + re) if tp else 0.0
    out.append({{"image_id": r["image_id"], "scores": {{"All": {{"pr": pr, "re": re, "f": f, "tp": tp}}}}}})
json.dump(out, open(args[args.index("-out") + 1], "w"))
"""


def _fake_java(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A stand-in ``java`` first on PATH and fake CoreNLP jars: (jar dir, call log)."""
    bin_dir, lib, log = tmp_path / "bin", tmp_path / "lib", tmp_path / "calls.log"
    bin_dir.mkdir(), lib.mkdir()
    for jar in spice.CORENLP_JARS:
        (lib / jar).write_bytes(b"")
    fake = bin_dir / "java"
    fake.write_text(FAKE_JAVA.format(python=sys.executable, java=shutil.which("java"), log=str(log)))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return lib, log


def _dice(test: str, ref: str) -> tuple[float, float, float]:
    """(F, precision, recall) as the stand-in computes them."""
    t, r = set(test.lower().split()), set(ref.lower().split())
    tp = len(t & r)
    pr, re = tp / len(t), tp / len(r)
    return (2 * pr * re / (pr + re) if tp else 0.0), pr, re


def test_score_runs_spice_once_over_all_pairs(tmp_path, monkeypatch):
    """With jars present, SPICE columns come from one SpiceScorer call covering every pair; per image
    SPICE-L, Precision and Recall are the maxima over single references, each chosen separately."""
    lib, log = _fake_java(tmp_path, monkeypatch)
    cands = {"i1": "a red flower in soft light", "i2": "sharp focus on the eyes"}
    refs = {"i1": ["red flower", "a red flower in soft light with many other words here and there too",
                   "red flower soft light"],
            "i2": ["focus is sharp", "eyes in focus here"]}
    corpus, per_image, notes = metrics.score(cands, refs, spice_lib=lib, progress=False)
    calls = [json.loads(line)["args"] for line in log.read_text().splitlines()]
    assert len(calls) == 1 and "-cache" not in calls[0]  # Java 17 here
    assert not notes and all(corpus[k] is not None for k in metrics.SPICE_KEYS)

    for i in cands:
        scored = [_dice(cands[i], r) for r in refs[i]]
        expected = (max(s[0] for s in scored), max(s[1] for s in scored), max(s[2] for s in scored))
        assert (per_image[i]["SPICE_L"], per_image[i]["Precision"], per_image[i]["Recall"]) == pytest.approx(expected)
        assert per_image[i]["SPICE"] == pytest.approx(_dice(cands[i], " ".join(refs[i]))[0])
    # i1: F is best on reference 2, precision on reference 1, recall on reference 0 (tied with 2: the first)
    best = per_image["i1"]
    assert (best["spice_best_reference"], best["precision_best_reference"], best["recall_best_reference"]) == (2, 1, 0)
    for k in ("SPICE_L", "Precision", "Recall"):
        assert corpus[k] == pytest.approx(sum(p[k] for p in per_image.values()) / 2)


def test_spice_gets_the_ptb_tokenised_text(tmp_path, monkeypatch):
    """SPICE sees exactly what pycocoevalcap's PTBTokenizer gives the other metrics (COCOEvalCap's behaviour)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    lib, log = _fake_java(tmp_path, monkeypatch)
    cands = {"i1": "A RED flower, in soft light!", "i2": "Sharp focus (on the eyes)."}
    refs = {"i1": ["The flower is red.", "Soft light; nice colours..."], "i2": ["Focus is sharp!", "Eyes in focus, here."]}
    metrics.score(cands, refs, spice_lib=lib, progress=False)
    (call,) = [json.loads(line) for line in log.read_text().splitlines()]
    seen = {r["image_id"]: (r["test"], r["refs"]) for r in call["rows"]}
    tok = PTBTokenizer().tokenize({("c", i): [{"caption": c}] for i, c in cands.items()}
                                  | {("r", i): [{"caption": r} for r in rs] for i, rs in refs.items()})
    for i in cands:
        assert seen[f"{i}#all"] == (tok[("c", i)][0], tok[("r", i)])
        for j, ref in enumerate(tok[("r", i)]):
            assert seen[f"{i}#{j}"] == (tok[("c", i)][0], [ref])
    assert seen["i1#all"][0] == "a red flower in soft light"  # the oracle does tokenise (lower case, no punctuation)
