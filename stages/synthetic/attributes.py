"""The six aesthetic attributes of the synthetic corpus: values, score weights, and how critics talk about them.

One place for the corpus's language: the colloquial phrase bank (``PHRASES``), the reference critiques
the generator writes from it (``reference``), and the reverse, reading which attribute values a
critique asserts (``asserted_values``), which the report uses to score generated critiques against an
image's true attributes. Phrases are matched whole (case, spacing and punctuation around them
ignored); no phrase occurs inside another one, so a critique asserts exactly what its phrases say.
"""
from __future__ import annotations

import re

import numpy as np

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "placement": ("thirds", "centre", "edge"),
    "exposure": ("under", "balanced", "blown"),
    "colour": ("muted", "vivid", "clashing"),
    "focus": ("sharp", "blurred"),
    "horizon": ("level", "tilted"),
    "noise": ("clean", "noisy"),
}

SUBJECT_ATTRIBUTES = ("placement", "exposure", "colour", "focus")  # per subject
GLOBAL_ATTRIBUTES = ("horizon", "noise")  # of the whole image

SCORE_WEIGHTS: dict[str, dict[str, float]] = {
    "placement": {"thirds": 1.0, "centre": -0.3, "edge": -0.9},
    "exposure": {"under": -0.5, "balanced": 0.8, "blown": -0.6},
    "colour": {"muted": -0.2, "vivid": 0.9, "clashing": -0.7},
    "focus": {"sharp": 0.7, "blurred": -0.7},
    "horizon": {"level": 0.35, "tilted": -0.45},
    "noise": {"clean": 0.1, "noisy": -0.4},
}

# Colloquial phrase bank: no phrase of one value occurs inside a phrase of another value.
PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "placement": {
        "thirds": (
            "nice use of the rule of thirds",
            "the subject sits nicely on a third",
            "good off-centre placement",
            "love where you put the subject",
            "the composition feels balanced",
        ),
        "centre": (
            "subject is dead centre, try the thirds",
            "too centred, it feels static",
            "bullseye composition, move it off-centre",
            "the subject is plonked right in the middle",
            "everything is smack in the centre",
        ),
        "edge": (
            "the subject is cut off by the edge",
            "you chopped the subject at the frame edge",
            "give the subject some room, it's cropped too tight",
            "the main object is clipped by the border",
            "half the subject falls out of the frame",
        ),
    },
    "exposure": {
        "under": (
            "way too dark",
            "underexposed, lift the shadows",
            "the subject is lost in shadow",
            "needs a lot more light",
            "it's all murky and dark",
        ),
        "balanced": (
            "exposure is spot on",
            "nicely exposed",
            "good even exposure",
            "the light is just right",
            "great tonal range",
        ),
        "blown": (
            "the highlights are blown",
            "blown-out whites everywhere",
            "overexposed patches with no detail",
            "the bright spots are burnt out",
            "way too bright in places, pull the highlights down",
        ),
    },
    "colour": {
        "muted": (
            "colours are a bit flat",
            "muted palette, feels washed out",
            "the colours look dull",
            "could use more saturation",
            "rather grey and lifeless colours",
        ),
        "vivid": (
            "love the colours",
            "colours really pop",
            "rich vivid colours",
            "lovely saturated palette",
            "the colour harmony works",
        ),
        "clashing": (
            "the colours clash",
            "garish colour combination",
            "those colours fight each other",
            "jarring colour mix",
            "the colour scheme hurts my eyes",
        ),
    },
    "focus": {
        "sharp": (
            "tack sharp",
            "crisp focus on the subject",
            "nice sharp detail",
            "focus is nailed",
            "the texture is beautifully crisp",
        ),
        "blurred": (
            "the subject is soft",
            "focus missed, it's blurry",
            "out of focus subject",
            "a bit soft, not in focus",
            "the detail is all mushy",
        ),
    },
    "horizon": {
        "level": (
            "horizon is nice and level",
            "straight horizon",
            "the level horizon keeps it calm",
            "good job keeping the horizon straight",
        ),
        "tilted": (
            "horizon is crooked",
            "the horizon is tilted, straighten it",
            "wonky horizon",
            "the horizon slopes downhill",
            "the whole scene leans",
        ),
    },
    "noise": {
        "clean": (
            "clean image, no noise",
            "nice smooth tones",
            "very clean file",
        ),
        "noisy": (
            "lots of noise",
            "noisy, try a lower ISO",
            "grainy all over",
            "the grain is distracting",
        ),
    },
}
MENTION_WEIGHT = {"placement": 1.0, "exposure": 1.0, "colour": 1.0, "focus": 1.0, "horizon": 0.8, "noise": 0.5}
OPENERS = ("Nice shot.", "Interesting scene.", "Thanks for sharing.", "A few thoughts.", "Okay.", "Hmm.", "Nice try.")
VERDICTS = {
    "high": ("Overall a strong image.", "Really well done.", "One of the better ones.", "Great work overall."),
    "mid": ("Decent overall.", "Solid, with room to improve.", "Not bad at all.", "Getting there."),
    "low": ("Overall it doesn't work for me.", "Needs another go.", "Keep practising.", "Not a keeper, sorry."),
}


def describe(attributes: dict[str, str]) -> list[str]:
    """All phrases that truthfully describe ``attributes`` (one list over every attribute)."""
    return [p for key, value in attributes.items() for p in PHRASES[key][value]]


def is_positive(key: str, value: str) -> bool:
    """Whether ``value`` of attribute ``key`` raises the score (a strength rather than a flaw)."""
    return SCORE_WEIGHTS[key][value] >= 0


def verdict_band(score: float) -> str:
    return "high" if score >= 7.0 else "mid" if score >= 4.5 else "low"


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def reference(rng: np.random.Generator, attributes: dict[str, str], score: float) -> str:
    """1-3 sentences: optional opener, 1-3 attribute remarks, optional verdict."""
    keys = list(attributes)
    weights = np.array([MENTION_WEIGHT[k] for k in keys])
    k = int(rng.choice([1, 2, 3], p=[0.35, 0.45, 0.2]))
    chosen = rng.choice(len(keys), size=k, replace=False, p=weights / weights.sum())
    remarks = [(str(rng.choice(PHRASES[keys[i]][attributes[keys[i]]])), is_positive(keys[i], attributes[keys[i]]))
               for i in chosen]
    sentences = _joined(remarks)
    if rng.random() < 0.45 and len(sentences) < 3:
        sentences.append(str(rng.choice(VERDICTS[verdict_band(score)])))
    if rng.random() < 0.3 and len(sentences) < 3:
        sentences.insert(0, str(rng.choice(OPENERS)))
    return " ".join(sentences)


def _joined(remarks: list[tuple[str, bool]]) -> list[str]:
    """(phrase, is a strength) remarks as sentences of at most two remarks: "x and y" when both are strengths or
    both flaws, "x, but y" otherwise."""
    sentences = []
    for i in range(0, len(remarks), 2):
        pair = remarks[i:i + 2]
        if len(pair) == 2:
            joiner = " and " if pair[0][1] == pair[1][1] else ", but "
            sentences.append(_sentence(pair[0][0] + joiner + pair[1][0]))
        else:
            sentences.append(_sentence(pair[0][0]))
    return sentences


def full_critique(rng: np.random.Generator, attributes: dict[str, str]) -> str:
    """A critic who remarks on every attribute, in a random order (so any of them may open the critique, as in the
    references), each with a random phrase of the bank, joined as :func:`reference` joins them (the demo base's
    pretraining critiques)."""
    keys = [str(k) for k in rng.permutation(list(ATTRIBUTES))]
    return " ".join(_joined([(str(rng.choice(PHRASES[key][attributes[key]])), is_positive(key, attributes[key]))
                             for key in keys]))


def critique_of(attributes: dict[str, str]) -> str:
    """A critique asserting every given attribute value (the first phrase of each), one sentence per value."""
    return " ".join(_sentence(PHRASES[key][value][0]) for key, value in attributes.items())


# ---------------------------------------------------------------------------------------------- reading back


def _normalise(text: str) -> str:
    """Lower case, typographic apostrophes made plain, every run of non-word characters one space."""
    text = text.lower().replace("\u2019", "'")
    return " " + " ".join(re.findall(r"[a-z0-9']+", text)) + " "


_MATCHERS: list[tuple[str, str, str]] = sorted(  # (normalised phrase, attribute, value), longest first
    ((_normalise(p), key, value) for key, values in PHRASES.items() for value, ps in values.items() for p in ps),
    key=lambda m: -len(m[0]),
)


def asserted_values(critique: str) -> dict[str, set[str]]:
    """attribute -> the values ``critique`` asserts (by whole phrases of the bank); absent when none."""
    text = _normalise(critique)
    found: dict[str, set[str]] = {}
    for phrase, key, value in _MATCHERS:
        if phrase in text:
            found.setdefault(key, set()).add(value)
    return found


# ---------------------------------------------------------------------------------------------- plain descriptions

DESCRIBE_PROMPT = "Describe this image."  # what the demo base is pretrained to answer with a scene description
CRITIQUE_PROMPT = "Critique the {} subject."  # a position of POSITIONS: the demo base critiques the subject named

# What a captioner pretrained on scene descriptions says (plain, judgement-free words, unlike the critiques'
# phrase bank): the demo base model learns these first, then fine-tuning teaches it the critics' language.
DESCRIPTIONS: dict[str, dict[str, str]] = {
    "placement": {"thirds": "the subject on a third line", "centre": "the subject in the middle",
                  "edge": "the subject at the frame border"},
    "exposure": {"under": "a dark exposure", "balanced": "an even exposure", "blown": "clipped white highlights"},
    "colour": {"muted": "desaturated colours", "vivid": "saturated neighbouring hues",
               "clashing": "saturated opposite hues"},
    "focus": {"sharp": "a crisp subject texture", "blurred": "a blurred subject texture"},
    "horizon": {"level": "a horizontal horizon", "tilted": "a slanted horizon"},
    "noise": {"clean": "no grain", "noisy": "heavy grain"},
}


def description(attributes: dict[str, str]) -> str:
    """A plain scene description naming every attribute value, in ``ATTRIBUTES`` order."""
    parts = [DESCRIPTIONS[key][attributes[key]] for key in ATTRIBUTES]
    return f"A photo with {', '.join(parts[:-1])} and {parts[-1]}."


def described_values(text: str) -> dict[str, set[str]]:
    """attribute -> the values a plain description names (the reverse of ``description``)."""
    norm = _normalise(text)
    found: dict[str, set[str]] = {}
    for key, values in DESCRIPTIONS.items():
        for value, phrase in values.items():
            if _normalise(phrase) in norm:
                found.setdefault(key, set()).add(value)
    return found


_HUES = ("red", "orange", "yellow", "lime", "green", "spring green", "cyan", "azure", "blue", "violet", "magenta",
         "rose")  # 12 names around the colour wheel, red at hue 0


def hue_name(hue: float) -> str:
    """The nearest of 12 colour-wheel names for a hue in [0, 1)."""
    return _HUES[round(hue * len(_HUES)) % len(_HUES)]


def _side(value: float, low: str, mid: str, high: str) -> str:
    return low if value < 0.42 else high if value > 0.58 else mid


POSITIONS = ("left", "middle", "right")  # the subjects' names, left to right (three subjects)


def left_to_right(scene: dict) -> list[int]:
    """Subject indices (of the annotation's "subjects") ordered by their centre's x."""
    return sorted(range(len(scene["subjects"])), key=lambda k: scene["subjects"][k]["x"])


def _where(x: float, y: float) -> str:
    if min(x, y, 1 - x, 1 - y) < 0.1:
        return "at the " + ("left" if x < 0.1 else "right" if x > 0.9 else "top" if y < 0.1 else "bottom") + " border"
    vertical, horizontal = _side(y, "upper", "middle", "lower"), _side(x, "left", "centre", "right")
    return "at the centre" if (vertical, horizontal) == ("middle", "centre") else f"in the {vertical} {horizontal}"


def subject_description(attributes: dict[str, str], drawn: dict) -> str:
    """One subject in plain words: what it looks like, where it is, then its four attribute values."""
    hues = " and ".join(dict.fromkeys(hue_name(h) for h in drawn["hues"]))
    tone = "pale " if attributes["colour"] == "muted" else ""
    values = ", ".join(DESCRIPTIONS[key][attributes[key]] for key in SUBJECT_ATTRIBUTES)
    return f"a {tone}{hues} {drawn['pattern']} subject {_where(drawn['x'], drawn['y'])}, with {values}"


def scene_description(subjects: list[dict[str, str]], attributes: dict[str, str], scene: dict) -> str:
    """A plain description of a rendered scene naming every subject, left to right, one sentence each, then the
    setting and the global attributes; it never says which subject is the aesthetic one. What the demo base
    model is pretrained on (``scene``: what ``render`` drew)."""
    parts = [f"On the {POSITIONS[rank]}, {subject_description(subjects[k], scene['subjects'][k])}."
             for rank, k in enumerate(left_to_right(scene))]
    angle = scene["horizon_angle"]
    slope = "" if angle == 0 else f" sloping down to the {'right' if angle > 0 else 'left'}"
    height = _side(scene["horizon_height"], "high", "halfway", "low")
    setting = (f"A {scene['sky']} sky over {scene['ground']}, the horizon {height}{slope}, with "
               f"{DESCRIPTIONS['horizon'][attributes['horizon']]} and {DESCRIPTIONS['noise'][attributes['noise']]}.")
    return " ".join([*parts, setting])


def described_subjects(text: str) -> list[dict[str, set[str]]]:
    """Per subject sentence of a scene description ("On the left, ..."), left to right, the values it names,
    and last the setting sentence's (the reverse of ``scene_description``)."""
    sentences = [s for s in re.split(r"(?<=\.)\s+", text.strip()) if s]
    return [described_values(s) for s in sentences]
