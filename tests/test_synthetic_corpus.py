"""The synthetic demo corpus: determinism, splits, sizes, subjects and masks, score and reference semantics."""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.synthetic import attributes as sa
from stages.synthetic import corpus as sc


def _records(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / sc.ANNOTATIONS).read_text().splitlines()]


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path, rec: dict) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(Image.open(root / rec["file"]).convert("RGB"), dtype=np.float32) / 255  # [h, w, 3]
    mask = Image.open(root / rec["mask"])
    assert mask.mode == "L"
    return image, np.asarray(mask)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    sc.generate_corpus(root, n=24, seed=3)
    return root


@pytest.fixture(scope="module")
def annotations() -> list[dict]:
    """The default-size corpus's annotations (no rendering needed)."""
    return [sc.annotation(i, seed=0) for i in range(240)]


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    sc.generate_corpus(a, n=6, seed=11)
    sc.generate_corpus(b, n=6, seed=11)
    sc.generate_corpus(c, n=6, seed=12)
    ha, hb, hc = _hashes(a), _hashes(b), _hashes(c)
    assert len(ha) == 26  # 6 images, masks, subject label maps and scenes, annotations, generator parameters
    assert ha == hb
    assert ha.keys() == hc.keys() and all(ha[k] != hc[k] for k in ha)


def test_counts_and_splits(corpus: Path) -> None:
    records = _records(corpus)
    assert len(records) == 24 and len({r["image_id"] for r in records}) == 24
    assert {r["split"] for r in records} == {"train", "validation", "test"}
    for n in (240, 1000):
        splits = sc.assign_splits(n, seed=0)
        counts = {s: splits.count(s) for s in ("train", "validation", "test")}
        assert counts == {"train": round(0.7 * n), "validation": round(0.1 * n), "test": round(0.2 * n)}
        assert splits == sc.assign_splits(n, seed=0) != sc.assign_splits(n, seed=1)
    for r in records:
        assert set(r) >= {"image_id", "split", "file", "score", "references", "attributes", "mask", "subjects",
                          "aesthetic", "subject_labels", "scene"}
        scene = json.loads((corpus / f"scenes/{r['image_id']}.json").read_text())
        assert r["scene"] == scene and len(scene["subjects"]) == sc.N_SUBJECTS
        assert all(0 <= d["x"] <= 1 and 0 <= d["y"] <= 1 for d in scene["subjects"])
        assert r["file"] == f"images/{r['image_id']}.jpg" and r["mask"] == f"masks/{r['image_id']}.png"
        assert r["subject_labels"] == f"subjects/{r['image_id']}.png"
        assert {k: v in sa.ATTRIBUTES[k] for k, v in r["attributes"].items()} == {k: True for k in sa.ATTRIBUTES}
        assert 1.0 <= r["score"] <= 10.0 and len(r["references"]) == 5
        assert len(r["subjects"]) == sc.N_SUBJECTS and 0 <= r["aesthetic"] < sc.N_SUBJECTS
        assert r["subjects"][r["aesthetic"]] == {k: r["attributes"][k] for k in sc.SUBJECT_ATTRIBUTES}
        assert sum(s["placement"] == "centre" for s in r["subjects"]) <= 1


def test_other_subjects_are_independent_of_the_aesthetic_one(annotations: list[dict]) -> None:
    """The other subjects' values do not follow the aesthetic subject's (except the single centre), and the
    aesthetic subject's position in the drawing order is uniform."""
    for key in ("exposure", "colour", "focus"):
        same = np.mean([s[key] == a["attributes"][key] for a in annotations
                        for k, s in enumerate(a["subjects"]) if k != a["aesthetic"]])
        assert abs(same - 1 / len(sa.ATTRIBUTES[key])) < 0.08, key
    counts = np.bincount([a["aesthetic"] for a in annotations], minlength=sc.N_SUBJECTS)
    assert counts.min() > 0.2 * len(annotations)


def test_sizes_and_masks_aligned(corpus: Path) -> None:
    aspects = []
    for r in _records(corpus):
        image, mask = _load(corpus, r)
        h, w = mask.shape
        assert image.shape == (h, w, 3) == (r["height"], r["width"], 3)
        assert 256 <= h <= 1024 and 256 <= w <= 1024
        assert set(np.unique(mask)) == {0, 255}
        assert 0.01 <= (mask > 0).mean() <= 0.12, r["image_id"]
        with Image.open(corpus / r["subject_labels"]) as labels:
            labels = np.asarray(labels)
        assert labels.shape == mask.shape and set(np.unique(labels)) == set(range(sc.N_SUBJECTS + 1))
        assert (mask[labels == r["aesthetic"] + 1] > 0).all()  # the aesthetic subject's label lies in its mask
        areas = [(labels == k + 1).mean() for k in range(sc.N_SUBJECTS)]
        assert max(areas) < 4 * min(areas), (r["image_id"], areas)  # comparable sizes (edge subjects are cut)
        aspects.append(w / h)
    assert min(aspects) >= 0.5 - 0.01 and max(aspects) <= 2.5 + 0.01
    assert min(aspects) < 0.9 and max(aspects) > 1.4  # both portrait and wide frames occur


def _chromatic(image: np.ndarray) -> np.ndarray:
    """Pixels with chroma (max - min RGB, in [0, 1]) above 0.55. [h, w] bool"""
    return (image.max(-1) - image.min(-1)) > 0.55


def test_saturated_pixels_belong_to_subjects(corpus: Path) -> None:
    """Colour test: background palettes have chroma <= ~0.45 even with jitter, texture and JPEG, while vivid /
    clashing subjects are HSV s >= 0.85, v >= 0.8 (chroma >= 0.68 before shading). So in clean images every
    strongly chromatic pixel lies in some subject's labelled silhouette."""
    checked = 0
    for r in _records(corpus):
        if r["attributes"]["noise"] == "clean":
            image, _ = _load(corpus, r)
            with Image.open(corpus / r["subject_labels"]) as labels:
                outside = np.asarray(labels) == 0
            chromatic = _chromatic(image)
            assert (chromatic & outside).sum() <= 0.002 * chromatic.sum() + 5, r["image_id"]
            checked += 1
    assert checked >= 5


def test_masks_encode_no_attribute_value() -> None:
    """Same seed and placements, any exposure, colour, focus, horizon and noise: byte-identical mask and labels
    (the silhouettes, dilated by a fixed amount), while the pixels change."""
    base = sc.annotation(3, seed=0)
    renders = []
    for variant in range(6):
        rng = np.random.default_rng(variant)
        subjects = [{**s, **{k: str(rng.choice(sa.ATTRIBUTES[k])) for k in ("exposure", "colour", "focus")}}
                    for s in base["subjects"]]
        attributes = {**base["attributes"], **subjects[base["aesthetic"]],
                      "horizon": ("level", "tilted")[variant % 2], "noise": ("clean", "noisy")[variant // 3]}
        renders.append(sc.render({**base, "subjects": subjects, "attributes": attributes}, np.random.default_rng(42)))
    image0, mask0, labels0 = renders[0]
    for image, mask, labels in renders[1:]:
        assert (mask == mask0).all() and (labels == labels0).all()
        assert (image != image0).mean() > 0.1


def test_aesthetic_subject_carries_the_centre_cue() -> None:
    """The cue: a crisp spot at the aesthetic subject's centre whatever its focus and exposure (near black; near white
    on an under-exposed subject); at the other subjects' centres the subject's own pattern, blurred or not."""
    cue, other = [], []
    for index in range(32):
        ann = sc.annotation(index, seed=4)
        scene: dict = {}
        image, _, _ = sc.render(ann, sc.rngs(4, index)[1], scene)
        h, w = image.shape[:2]
        for k, drawn in enumerate(scene["subjects"]):
            cx, cy = round(drawn["x"] * w), round(drawn["y"] * h)
            radius = drawn["size"] * math.sqrt(h * w)
            if not (radius < cx < w - radius and radius < cy < h - radius):
                continue  # a subject cut by the frame may have its centre outside it
            r = max(1, int(0.4 * sc.CUE_RADIUS * radius))
            centre = image[cy - r:cy + r + 1, cx - r:cx + r + 1].mean()
            spot = centre > 200 if ann["subjects"][k]["exposure"] == "under" else centre < 40
            (cue if k == ann["aesthetic"] else other).append(spot)
    assert len(cue) >= 12 and np.mean(cue) >= 0.9, cue  # 12 of 32 aesthetic subjects wholly in frame at least
    assert np.mean(other) <= 0.2


def test_score_monotone_in_attributes(annotations: list[dict]) -> None:
    def mean(key: str, value: str) -> float:
        return float(np.mean([a["score"] for a in annotations if a["attributes"][key] == value]))

    assert mean("placement", "thirds") > mean("placement", "centre") > mean("placement", "edge")
    assert mean("exposure", "balanced") > max(mean("exposure", "under"), mean("exposure", "blown"))
    assert mean("colour", "vivid") > mean("colour", "muted") > mean("colour", "clashing")
    assert mean("focus", "sharp") > mean("focus", "blurred")
    assert mean("horizon", "level") > mean("horizon", "tilted")
    assert mean("noise", "clean") > mean("noise", "noisy")
    scores = np.array([a["score"] for a in annotations])
    assert 4.5 < scores.mean() < 6.5 and scores.std() > 1.0
    # noisy, not a lookup: identical attribute sets get different scores
    by_attrs: dict[str, set[float]] = {}
    for a in annotations:
        by_attrs.setdefault(json.dumps(a["attributes"], sort_keys=True), set()).add(a["score"])
    assert any(len(s) > 1 for s in by_attrs.values())


def test_phrase_bank_is_unambiguous() -> None:
    for key, values in sa.PHRASES.items():
        assert set(values) == set(sa.ATTRIBUTES[key])
        for value, phrases in values.items():
            assert len(phrases) >= 3
            others = [p for v, ps in values.items() if v != value for p in ps]
            assert not any(p in q for p in phrases for q in others), (key, value)


def test_references_mention_true_attributes_only(annotations: list[dict]) -> None:
    all_refs = []
    for a in annotations:
        attrs = a["attributes"]
        true = [p.lower() for p in sa.describe(attrs)]
        false = [p.lower() for k, vs in sa.PHRASES.items() for v, ps in vs.items() if v != attrs[k] for p in ps]
        for ref in a["references"]:
            low = ref.lower()
            assert 1 <= len(re.findall(r"[.!?](?:\s|$)", ref)) <= 3, ref
            assert any(p in low for p in true), ref
            assert not any(p in low for p in false), (ref, attrs)
            if any(v in ref for v in sa.VERDICTS["high"]):
                assert a["score"] >= 7.0
            if any(v in ref for v in sa.VERDICTS["low"]):
                assert a["score"] < 4.5
        all_refs += a["references"]
    assert len(set(all_refs)) > 0.8 * len(all_refs)  # varied phrasing


def test_idempotent_and_resumes_after_kill(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    sc.generate_corpus(root, n=5, seed=2)
    before = _hashes(root)
    stamp = (root / sc.ANNOTATIONS).stat().st_mtime_ns
    first_image = root / "images" / "syn00000.jpg"
    image_stamp = first_image.stat().st_mtime_ns
    sc.generate_corpus(root, n=5, seed=2)
    assert (root / sc.ANNOTATIONS).stat().st_mtime_ns == stamp and first_image.stat().st_mtime_ns == image_stamp

    # A kill mid-regeneration: a half-written image and no annotations yet.
    (root / sc.ANNOTATIONS).unlink()
    first_image.write_bytes(first_image.read_bytes()[:100])
    sc.generate_corpus(root, n=5, seed=2)
    assert _hashes(root) == before

    sc.generate_corpus(root, n=3, seed=2)  # different parameters: regenerated, stale files removed
    assert len(_records(root)) == 3
    assert sorted(p.name for p in (root / "images").iterdir()) == ["syn00000.jpg", "syn00001.jpg", "syn00002.jpg"]


def test_parallel_generation_killed_midway_resumes_identically(tmp_path: Path) -> None:
    """Real SIGKILL of a 2-process generation; the rerun keeps what was done and matches a clean serial run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    clean, killed = tmp_path / "clean", tmp_path / "killed"
    sc.generate_corpus(clean, n=40, seed=5, workers=1)
    code = f"from stages.synthetic.corpus import generate_corpus; generate_corpus({str(killed)!r}, n=40, seed=5, workers=2)"
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.time() + 120
    while len(list((killed / "images").glob("syn*.jpg"))) < 10 and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / sc.ANNOTATIONS).exists()
    done = {p.name: p.stat().st_mtime_ns for p in (killed / "images").glob("syn*.jpg")}
    sc.generate_corpus(killed, n=40, seed=5, workers=2)
    assert _hashes(killed) == _hashes(clean)
    kept = {p.name: p.stat().st_mtime_ns for p in (killed / "images").glob("syn*.jpg") if p.name in done}
    assert kept == done  # finished images were not rendered again
