"""Metrics: equal to pycocoevalcap called directly; SPICE absent -> null + reason; CLI; incremental."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from stages.report import metrics, score_cli
from stages.report.metrics import METRIC_KEYS, SPICE_KEYS
from stages.report.spice import find_spice_lib

ASPECTS = ("general_impression", "subject_of_photo", "composition", "use_of_camera", "depth_of_field",
           "color_lighting", "focus")


def pccd_pairs(shared: Path, n: int = 40) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Real PCCD critiques: candidate = one held-out aspect critique, references = the others."""
    records = json.loads((shared / "data" / "pccd_guru_validation.json").read_text())
    cands, refs = {}, {}
    for i, rec in enumerate(records[:n]):
        texts = [rec[a] for a in ASPECTS if rec.get(a)]
        cands[f"pccd-{i}"], refs[f"pccd-{i}"] = texts[i % len(texts)], texts[:i % len(texts)] + texts[i % len(texts) + 1:]
    cands["pccd-0"] = "A line\nbreak, \"quotes\" & ünïcode — dashes... and (brackets)!"
    return cands, refs


@pytest.fixture(scope="module")
def scored(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real `ase-mllm score` run (one METEOR JVM) shared by the tests below."""
    cands, refs = pccd_pairs(shared_dir)
    tmp = tmp_path_factory.mktemp("score")
    (tmp / "c.jsonl").write_text("".join(json.dumps({"image_id": i, "caption": c}) + "\n" for i, c in cands.items()))
    extra = {"not-a-candidate": ["ignored reference"]}
    (tmp / "r.jsonl").write_text(
        "".join(json.dumps({"image_id": i, "captions": r}) + "\n" for i, r in {**refs, **extra}.items())
    )
    app = typer.Typer()
    score_cli.register(app)
    app.command("noop")(lambda: None)  # keep `score` a named sub-command
    args = ["score", "--candidates", str(tmp / "c.jsonl"), "--references", str(tmp / "r.jsonl"), "--out", str(tmp / "metrics.json")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return cands, refs, tmp, result.output


@pytest.fixture(scope="module")
def oracle(scored):
    """pycocoevalcap's own scorers and tokenizer, called the documented way."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    cands, refs, _, _ = scored
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": r} for r in refs[i]] for i in cands})
    res = tok.tokenize({i: [{"caption": c}] for i, c in cands.items()})
    corpus, each = {}, {}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        corpus[f"Bleu_{n + 1}"], each[f"Bleu_{n + 1}"] = bleu[n], bleu_each[n]
    for key, scorer in (("METEOR", Meteor()), ("ROUGE_L", Rouge()), ("CIDEr", Cider())):
        corpus[key], each[key] = scorer.compute_score(gts, res)
    return corpus, {k: dict(zip(gts, v)) for k, v in each.items()}


def test_corpus_scores_equal_pycocoevalcap(scored, oracle):
    _, _, tmp, _ = scored
    ours = json.loads((tmp / "metrics.json").read_text())
    assert set(METRIC_KEYS) <= set(ours)
    for key, value in oracle[0].items():
        assert ours[key] == float(value), key  # exact
    assert ours["n_images"] == len(scored[0])


def test_per_image_scores_equal_pycocoevalcap(scored, oracle):
    cands, _, tmp, _ = scored
    rows = [json.loads(line) for line in (tmp / "per_image.jsonl").read_text().splitlines()]
    assert [r["image_id"] for r in rows] == list(cands)
    for row in rows:
        for key, values in oracle[1].items():
            assert row[key] == float(values[row["image_id"]]), (key, row["image_id"])  # exact


def test_spice_columns_null_with_reason_when_jars_absent(scored):
    if find_spice_lib().lib is not None:
        pytest.skip("CoreNLP 3.6.0 jars are installed here: SPICE runs")
    _, _, tmp, output = scored
    ours = json.loads((tmp / "metrics.json").read_text())
    row = json.loads((tmp / "per_image.jsonl").read_text().splitlines()[0])
    for key in SPICE_KEYS:
        assert ours[key] is None and row[key] is None
        assert "stanford-corenlp-3.6.0-models.jar" in ours["notes"][key] and "ASE_SPICE_LIB" in ours["notes"][key]
    assert "SPICE=—" in output and "note: SPICE needs" in output


def test_unchanged_inputs_are_not_rescored(scored, monkeypatch):
    cands, refs, tmp, _ = scored
    out = tmp / "metrics.json"
    before = out.read_text()

    def must_not_run(*a, **k):
        raise AssertionError("rescored unchanged inputs")

    monkeypatch.setattr(metrics, "score", must_not_run)
    result, rescored = metrics.score_to_file(out, cands, {**refs, "unrelated": ["x"]})
    assert not rescored and out.read_text() == before and result["CIDEr"] == json.loads(before)["CIDEr"]

    calls = []
    monkeypatch.setattr(metrics, "score", lambda c, r, **k: calls.append(c) or ({}, {}, {}))
    changed = {**cands, "pccd-1": cands["pccd-1"] + " changed"}
    metrics.score_to_file(tmp / "other.json", changed, refs, progress=False)
    assert len(calls) == 1 and (tmp / "other.per_image.jsonl").exists()


def test_missing_java_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(metrics.JavaNotFoundError, match="apt-get install -y default-jre-headless"):
        metrics.score({"a": "a photo"}, {"a": ["a picture"]})


def test_candidate_without_references_is_an_error():
    with pytest.raises(ValueError, match="1 candidate image"):
        metrics.score({"a": "x", "b": "y"}, {"a": ["x"]})


# --- retrieval baselines (stages/report/baselines.py) -------------------------------------------

def test_consensus_centrality_equals_sklearn_pairwise_mean(shared_dir: Path):
    sklearn_text = pytest.importorskip("sklearn.feature_extraction.text")
    from sklearn.metrics.pairwise import cosine_similarity

    from stages.report.baselines import centrality, consensus_baseline

    cands, refs = pccd_pairs(shared_dir, n=60)
    texts = [t for i in cands for t in refs[i]] + ["", "!!!"]  # texts without words too
    v = sklearn_text.TfidfVectorizer(token_pattern=r"[a-z0-9']+", lowercase=True, smooth_idf=True).fit_transform(texts)
    sim = cosine_similarity(v)
    expected = (sim.sum(axis=1) - sim.diagonal()) / (len(texts) - 1)
    assert centrality(texts) == pytest.approx(expected, abs=1e-12)
    assert consensus_baseline(texts, ["t1", "t2"]) == {i: texts[int(expected.argmax())] for i in ("t1", "t2")}


def test_nearest_image_baseline_on_canonical_tables(tmp_path):
    import pyarrow as pa
    from PIL import Image

    from pipeline.paths import dataset_dir
    from stages.report.baselines import retrieval_baselines
    from storage.atomic import write_json_atomic, write_parquet_atomic
    from storage.tables import COMMENTS_SCHEMA, IMAGES_SCHEMA, table_path

    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 40), "t-red": (200, 40, 50),
               "t-green": (40, 180, 60)}
    for name, rgb in colours.items():
        Image.new("RGB", (80, 60), rgb).save(tmp_path / f"{name}.jpg")
    images = [{"image_id": n, "split": "test" if n.startswith("t-") else "train", "path": f"{n}.jpg", "width": 80,
               "height": 60, "sha256": n, "score": None} for n in colours]
    texts = {"red": ["the red tones work well", "red colour is strong"], "blue": ["cool blue mood"],
             "green": ["green grass fills the frame", "lovely green light and frame"]}
    comments = [{"image_id": i, "comment_id": f"{i}{k}", "text": t, "aspect": None}
                for i, ts in texts.items() for k, t in enumerate(ts)]
    write_parquet_atomic(table_path("toy", "images"), pa.Table.from_pylist(images, IMAGES_SCHEMA))
    write_parquet_atomic(table_path("toy", "comments"), pa.Table.from_pylist(comments, COMMENTS_SCHEMA))
    write_json_atomic(dataset_dir("toy") / "meta.json", {"root": str(tmp_path), "format": "folder"})
    out = retrieval_baselines("toy")
    nearest = out["retrieval: nearest image"]
    assert set(nearest) == {"t-red", "t-green"}
    assert nearest["t-red"] in texts["red"] and nearest["t-green"] in texts["green"]
    assert set(out["retrieval: consensus"].values()) <= {t for ts in texts.values() for t in ts}
