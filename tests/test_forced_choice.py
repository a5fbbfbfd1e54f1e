"""Forced choices: teacher-forced continuation scores equal a plain per-sequence log-softmax over full logits
(both families, left-padded batches of different lengths), and the scoring of chosen values against the truth."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from test_generate import _images, tiles_for, tiny_captioner_parts

CONTINUATIONS = ["Nice use of the rule of thirds.", "Way too dark.", "The subject is cut off by the edge, a lot."]


def _plain_mean_logprob(model, prompt_ids: list[int], continuation: list[int], **image) -> float:
    """Oracle: one unpadded sequence, full logits, log-softmax at every continuation position."""
    ids = torch.tensor([prompt_ids + continuation])
    with torch.no_grad():
        logits = model(input_ids=ids, **image).logits[0]  # [L, V]
    logp = logits.float().log_softmax(-1)
    start = len(prompt_ids)
    return float(np.mean([logp[start + j - 1, t].item() for j, t in enumerate(continuation)]))


def test_internvl_continuation_scores_equal_plain_full_logits() -> None:
    from stages.families.internvl.captioner import InternVLCaptioner
    from stages.families.internvl.collate import saliency_inputs

    model, tok = tiny_captioner_parts()
    cap = InternVLCaptioner(model, tok, tiles_for(model), torch.device("cpu"))
    prompt = cap.prepare(_images()[1], np.random.default_rng(0).random((14, 14)))
    conts = [tok(c, add_special_tokens=False)["input_ids"] for c in CONTINUATIONS]
    assert len({len(c) for c in conts}) == 3  # left padding in the batch
    got = cap.continuation_logprobs(prompt, conts)
    image = dict(pixel_values=prompt.pixel_values, **saliency_inputs([prompt.saliency_map], [prompt.tile_grid]))
    want = [_plain_mean_logprob(model, prompt.input_ids, c, **image) for c in conts]
    assert torch.allclose(got, torch.tensor(want), atol=1e-4), (got, want)
    assert len(set(np.round(want, 3))) == 3


def test_qwen_continuation_scores_equal_plain_full_logits() -> None:
    from stages.families.qwen.captioner import QwenCaptioner
    from stages.families.qwen.data import ImageSpec
    from test_qwen_model import _captioner_parts, _images as qwen_images

    model, tok = _captioner_parts()
    cap = QwenCaptioner(model, tok, ImageSpec(max_pixels=4 * 224 * 224), torch.device("cpu"))
    prompt = cap.prepare(qwen_images()[1], np.random.default_rng(0).random((14, 14)))
    conts = [tok(c, add_special_tokens=False)["input_ids"] for c in CONTINUATIONS]
    got = cap.continuation_logprobs(prompt, conts)
    want = []
    for c in conts:
        ids = torch.tensor([prompt.input_ids + c])
        types = (ids == model.config.image_token_id).int()
        want.append(_plain_mean_logprob(model, prompt.input_ids, c, pixel_values=prompt.pixel_values,
                                        image_grid_thw=prompt.image_grid_thw,
                                        saliency_maps=prompt.saliency_map[None], mm_token_type_ids=types))
    assert torch.allclose(got, torch.tensor(want), atol=1e-4), (got, want)


def _entry(aesthetic: int, subjects: list[dict[str, str]]) -> dict:
    return {"aesthetic": aesthetic, "subjects": subjects}


def test_mask_following_counts_choices_that_describe_the_moved_to_subject() -> None:
    """Hand-made cases: the moved-to subject is the one after the aesthetic one; only attributes where it differs
    from the aesthetic subject count; the baseline is the same run's own-mask choices scored on the moved-to
    subject's values (what a model ignoring its map gets), per image too."""
    from stages.report.forced_choice import mask_following

    a = {"placement": "thirds", "exposure": "under", "colour": "vivid", "focus": "sharp"}
    b = {"placement": "edge", "exposure": "under", "colour": "muted", "focus": "blurred"}
    c = {"placement": "edge", "exposure": "blown", "colour": "clashing", "focus": "sharp"}
    entries = {"i": _entry(0, [a, b, c])}  # moved onto b; exposure equal to a's: not counted
    follows = {"i": {"placement": "edge", "exposure": "under", "colour": "muted", "focus": "blurred"}}
    own = {"i": {"placement": "edge", "exposure": "under", "colour": "vivid", "focus": "sharp"}}  # b's placement only
    result = mask_following(follows, own, entries)
    assert result["n"] == 3 and result["rate"] == 1.0 and result["stayed"] == 0.0
    assert result["baseline"] == pytest.approx(1 / 3) and result["per_image"] == {"i": [3, 1, 3]}
    assert result["per_attribute"]["placement"]["baseline"] == 1.0 and "exposure" not in result["per_attribute"]
    stays = mask_following({"i": dict(a)}, {"i": dict(a)}, entries)
    assert stays["rate"] == 0.0 and stays["stayed"] == 1.0 and stays["baseline"] == 0.0
    with pytest.raises(ValueError):
        mask_following({"i": dict(a)}, {"i": dict(a)}, {"i": _entry(0, [a, dict(a), c])})


def test_scores_average_the_aesthetic_subject_and_report_globals_apart() -> None:
    from stages.report.forced_choice import correct, forced_choice_scores

    truth = {"i": {"placement": "thirds", "exposure": "under", "colour": "vivid", "focus": "sharp",
                   "horizon": "level", "noise": "clean"}}
    chosen = {"i": {**truth["i"], "focus": "blurred", "horizon": "tilted", "noise": "noisy"}}
    scores = forced_choice_scores(chosen, truth)
    assert scores["accuracy"] == 0.75 and scores["global_accuracy"] == 0.0
    assert scores["chance"] == pytest.approx((1 / 3 * 3 + 1 / 2) / 4)
    assert correct(chosen, truth) == {"i": 0.75}
    assert correct(chosen, truth, ("exposure", "colour", "focus")) == {"i": pytest.approx(2 / 3)}
