"""Ground-truth attribute scoring and output diversity, checked against the generator's known attributes."""
from __future__ import annotations

from collections import Counter

import pytest

from stages.synthetic import attributes as sa
from stages.synthetic.corpus import annotation
from stages.report.attributes import attribute_scores, best_constant_critique, majority_critique
from stages.report.diversity import diversity

TRUTH = {f"i{n}": annotation(n, seed=0)["attributes"] for n in range(120)}


def _wrong(attrs: dict[str, str]) -> dict[str, str]:
    """Every attribute set to a value it does not have."""
    return {k: next(v for v in sa.ATTRIBUTES[k] if v != attrs[k]) for k in attrs}


def test_no_phrase_hides_inside_another_after_normalisation() -> None:
    phrases = [(sa._normalise(p), k, v) for k, vs in sa.PHRASES.items() for v, ps in vs.items() for p in ps]
    for p, k, v in phrases:
        for q, k2, v2 in phrases:
            if (k, v) != (k2, v2):
                assert p not in q, (p, q)


def test_generated_references_assert_only_true_values() -> None:
    """The generator writes references from the truth: read back, each asserts 1-3 true values and nothing false."""
    mentioned = Counter()
    for n in range(200):
        ann = annotation(n, seed=0)
        for ref in ann["references"]:
            said = sa.asserted_values(ref)
            assert 1 <= len(said) <= 3, ref
            assert all(values == {ann["attributes"][k]} for k, values in said.items()), (ref, ann["attributes"])
            mentioned.update(said.keys())
    assert set(mentioned) == set(sa.ATTRIBUTES)  # every attribute gets talked about


def test_full_critiques_assert_every_true_value() -> None:
    """The demo base's pretraining critiques, read back: every attribute, its true value only, varied wording."""
    import numpy as np

    rng = np.random.default_rng(0)
    texts = set()
    for n in range(200):
        truth = annotation(n, seed=1)["attributes"]
        text = sa.full_critique(rng, truth)
        assert sa.asserted_values(text) == {k: {v} for k, v in truth.items()}, (text, truth)
        texts.add(text)
    assert len(texts) == 200
    openers = {next(iter(sa.asserted_values(text.split(".")[0]))) for text in texts}
    assert openers == set(sa.ATTRIBUTES)  # any attribute may open (forced choice scores the opening sentence)


def test_reader_ignores_case_spacing_and_punctuation() -> None:
    assert sa.asserted_values("TACK   SHARP!! and the colours  clash…") == {"focus": {"sharp"}, "colour": {"clashing"}}
    assert sa.asserted_values("Give the subject some room, it’s cropped too tight.") == {"placement": {"edge"}}
    assert sa.asserted_values("A lovely photo.") == {}


def test_true_critiques_score_one_and_wrong_ones_zero() -> None:
    right = {i: sa.critique_of(t) for i, t in TRUTH.items()}
    wrong = {i: sa.critique_of(_wrong(t)) for i, t in TRUTH.items()}
    assert attribute_scores(right, TRUTH)["macro_precision"] == 1.0
    assert attribute_scores(right, TRUTH)["macro_recall"] == 1.0
    scores = attribute_scores(wrong, TRUTH)
    assert all(scores[f"{m}_{k}"] == 0.0 for k in sa.ATTRIBUTES for m in ("precision", "recall"))


def test_partial_and_conflicting_assertions() -> None:
    truth = {"a": TRUTH["i0"], "b": TRUTH["i1"]}
    wrong_exposure = {k: v for k, v in _wrong(truth["a"]).items() if k == "exposure"}
    critique = f"{sa.PHRASES['placement'][truth['a']['placement']][1]}. {sa.critique_of(wrong_exposure)}"
    both_focus = " ".join(sa.PHRASES["focus"][v][0] for v in sa.ATTRIBUTES["focus"])  # sharp AND blurred
    scores = attribute_scores({"a": critique, "b": both_focus}, truth)
    assert scores["precision_placement"] == 1.0 and scores["recall_placement"] == 0.5
    assert scores["precision_exposure"] == 0.0 and scores["recall_exposure"] == 0.0
    assert scores["precision_focus"] == 0.5 and scores["recall_focus"] == 0.5  # one of two claims right
    assert scores["precision_colour"] == 0.0  # never mentioned: no credit
    assert scores["macro_precision"] == pytest.approx((1.0 + 0.5) / 6)


def test_constant_critique_precision_is_the_value_frequency() -> None:
    values = {"placement": "edge", "exposure": "under", "colour": "vivid", "focus": "sharp", "horizon": "level",
              "noise": "clean"}
    scores = attribute_scores({i: sa.critique_of(values) for i in TRUTH}, TRUTH)
    for key, value in values.items():
        share = sum(t[key] == value for t in TRUTH.values()) / len(TRUTH)
        assert scores[f"precision_{key}"] == pytest.approx(share)
        assert scores[f"recall_{key}"] == pytest.approx(share)


def test_best_constant_is_the_majority_critique_unless_a_reference_does_better() -> None:
    majority = {k: Counter(t[k] for t in TRUTH.values()).most_common(1)[0][0] for k in sa.ATTRIBUTES}
    assert sa.asserted_values(majority_critique(list(TRUTH.values()))) == {k: {v} for k, v in majority.items()}
    refs = [r for n in range(120) for r in annotation(n, seed=0)["references"]]
    best = best_constant_critique(TRUTH, refs)
    assert best == majority_critique(list(TRUTH.values()))  # a 1-3 attribute reference cannot beat all six
    precision = lambda text: attribute_scores({i: text for i in TRUTH}, TRUTH)["macro_precision"]  # noqa: E731
    assert precision(best) >= max(precision(r) for r in refs[:200])


def test_diversity_of_constant_and_varied_outputs() -> None:
    constant = diversity({i: "Tack sharp. Love the colours." for i in range(10)})
    assert constant["distinct"] == pytest.approx(0.1)
    assert constant["distinct_1"] == pytest.approx(5 / 50)  # 5 distinct words of 50
    assert constant["distinct_2"] == pytest.approx(4 / 40)
    assert constant["mean_length"] == 5
    varied = diversity({1: "a b c", 2: "a b d", 3: "A  b c!"})  # case and punctuation do not make it new
    assert varied["distinct"] == pytest.approx(2 / 3)
    assert varied["distinct_1"] == pytest.approx(4 / 9)
    assert varied["distinct_2"] == pytest.approx(3 / 6)  # (a b), (b c), (b d)


def test_kappa_equals_sklearn_and_is_zero_for_a_constant_claim() -> None:
    """Per-attribute kappa against scikit-learn's cohen_kappa_score on the same (claimed, true) pairs; a critique
    that always claims one value scores 0 (and precision equal to that value's share)."""
    from sklearn.metrics import cohen_kappa_score

    rng = __import__("random").Random(3)
    claimed = {i: {k: (t[k] if rng.random() < 0.6 else rng.choice(sa.ATTRIBUTES[k])) for k in t}
               for i, t in TRUTH.items()}
    scores = attribute_scores({i: sa.critique_of(c) for i, c in claimed.items()}, TRUTH)
    for key in sa.ATTRIBUTES:
        said = {i: sa.asserted_values(sa.critique_of(c)).get(key, set()) for i, c in claimed.items()}
        single = [i for i in TRUTH if len(said[i]) == 1]
        expected = cohen_kappa_score([next(iter(said[i])) for i in single], [TRUTH[i][key] for i in single])
        assert scores[f"kappa_{key}"] == pytest.approx(expected, abs=1e-12), key
        assert 0.2 < scores[f"kappa_{key}"] < 0.9  # 60 % true claims: well above chance, below perfect
    constant = attribute_scores({i: majority_critique(list(TRUTH.values())) for i in TRUTH}, TRUTH)
    assert all(constant[f"kappa_{k}"] == 0 for k in sa.ATTRIBUTES)
    assert constant["macro_kappa"] == 0 and constant["macro_precision"] > 0.3


def test_scene_descriptions_name_every_subject_left_to_right_and_read_back() -> None:
    """The base's pretraining text names each subject's values in its own sentence, left to right, then the
    global ones; reading it back recovers them (oracle: the generator's draws), and it never names the aesthetic
    subject as such."""
    from stages.synthetic.corpus import SUBJECT_ATTRIBUTES, render, rngs

    for n in range(6):
        ann = annotation(n, seed=2)
        scene: dict = {}
        render(ann, rngs(2, n)[1], scene)
        text = sa.scene_description(ann["subjects"], ann["attributes"], scene)
        named = sa.described_subjects(text)
        order = sa.left_to_right(scene)
        assert [scene["subjects"][k]["x"] for k in order] == sorted(s["x"] for s in scene["subjects"])
        assert len(named) == 4 and text.startswith("On the left, ")
        for sentence, k in zip(named, order):
            assert sentence == {key: {ann["subjects"][k][key]} for key in SUBJECT_ATTRIBUTES}
        assert named[3] == {key: {ann["attributes"][key]} for key in ("horizon", "noise")}
        assert "aesthetic" not in text.lower()
