"""Pretrain the demo's base MLLM: a tiny InternVL taught to see the synthetic scenes, then to critique them.

The analogue of a real pretrained, instruction-tuned InternVL (what users fine-tune): a plain
``InternVLForConditionalGeneration`` (the ``demo`` shape of stages/families/internvl/model.py, no saliency fusion),
from scratch, in two phases on the seed-1 stream (the demo corpus is seed 0):

1. describe (``epochs``): every image's plain scene description (``synthetic.attributes.scene_description``:
   every subject, left to right, what it looks like, where it is and its attribute values in judgement-free
   words, then the setting), answering ``DESCRIBE_PROMPT``; the vision tower's patch tokens also feed the dense
   heads (each token: the attributes of the subject under it) and the pooled image-level heads of
   stages/pretrain/targets.py (both dropped when saving). Cached under ``work/pretrain/`` so phase 2 can be
   rerun alone.
2. critique (``critique_steps``): batches mixing critiques of one subject, named by its position
   (``CRITIQUE_PROMPT``: "Critique the left subject."), that remark on each of its attributes and the global
   ones in a random order (``synthetic.attributes.full_critique``: the critics' phrase bank) with descriptions
   (``DESCRIBE_PROMPT``), so the critic's words stay tied to what the vision tower sees. (Trained on the
   generator's 1-3 remark reference critiques instead, 600 steps gave one constant critique for every held-out
   image: which attributes a reference remarks on is random, so its likeliest sentence is the same for every
   image.)

Neither phase says which subject is the aesthetic one: like a generic InternVL before PCCD, the base can
describe and critique any subject it is pointed at; which one matters is learned in fine-tuning.

The tokenizer is a byte-level BPE trained on the corpus's descriptions and reference critiques, so
fine-tuning on critiques needs no new tokens. One tile per image (the whole image at 224 x 224), as the
demo fine-tunes it.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from pipeline.paths import work_dir
from stages.families.text import Encoded
from stages.synthetic.attributes import (ATTRIBUTES, CRITIQUE_PROMPT, DESCRIBE_PROMPT, GLOBAL_ATTRIBUTES, POSITIONS,
                                         SUBJECT_ATTRIBUTES, described_subjects, full_critique, left_to_right,
                                         scene_description)
from stages.pretrain.targets import AuxHeads, DenseHeads, Targets, dense_targets
from stages.schedule import warmup_cosine

def describe(record: dict[str, Any]) -> str:
    return scene_description(record["subjects"], record["attributes"], record["scene"])


def subject_truth(record: dict[str, Any], rank: int) -> dict[str, str]:
    """The attribute values a critique of the ``rank``-th subject from the left asserts: its own and the global."""
    k = left_to_right(record["scene"])[rank]
    return {**record["attributes"], **record["subjects"][k]}


DESCRIBE_VERSION = 2  # of phase 1's code (2: dense targets, DESCRIBE_PROMPT): part of its cache key


@dataclass(frozen=True)
class CaptionerRecipe:
    shape: str = "demo"  # a registered tiny shape (stages/families/internvl/model.py TINY_CONFIGS)
    epochs: int = 10  # phase 1, descriptions
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    aux_weight: float = 1.0
    vocab_size: int = 2048
    seed: int = 0
    critique_steps: int = 600  # phase 2, critiques mixed with descriptions
    critique_lr: float = 1e-3
    critique_share: float = 0.75
    critique_eval_every: int = 200

    def describe_phase(self) -> dict[str, Any]:
        """The fields phase 1 depends on (its cache key)."""
        return {k: v for k, v in asdict(self).items() if not k.startswith("critique_")}


def normalise(u8: Tensor) -> Tensor:
    """[B, H, W, 3] uint8 -> [B, 3, H, W] float with InternVL's (ImageNet) mean / std."""
    from stages.families.internvl.tiling import IMAGENET_MEAN, IMAGENET_STD

    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (u8.permute(0, 3, 1, 2).float() / 255 - mean) / std


def tokenizer_texts(records: list[dict[str, Any]], seed: int, n_reference_images: int = 3000) -> list[str]:
    """Every description, plus the five reference critiques of the first images (the critics' vocabulary)."""
    from stages.synthetic.corpus import annotation

    texts = [describe(r) for r in records] + [CRITIQUE_PROMPT.format(p) for p in POSITIONS]
    texts += [ref for r in records[:n_reference_images] for ref in annotation(r["index"], seed)["references"]]
    return texts


@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer: Any, images: np.ndarray, prompt: str, batch_size: int = 32,
                   max_new_tokens: int = 150) -> list[str]:
    """Greedy answers to ``prompt`` for [N, 224, 224, 3] images (one tile each)."""
    from stages.families.internvl.model import tokens_per_tile
    from stages.families.internvl.prompting import prompt_ids

    model.eval()
    ids = prompt_ids(tokenizer, tokens_per_tile(model.config), prompt)
    out: list[str] = []
    for i in range(0, len(images), batch_size):
        x = normalise(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])))
        ids_batch = torch.tensor([ids] * len(x))
        gen = model.generate(input_ids=ids_batch, attention_mask=torch.ones_like(ids_batch), pixel_values=x,
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        out += [" ".join(t.split()) for t in tokenizer.batch_decode(gen[:, ids_batch.shape[1]:],
                                                                    skip_special_tokens=True)]
    return out


def evaluate(model: nn.Module, tokenizer: Any, images: np.ndarray, records: list[dict[str, Any]],
             prompt: str = DESCRIBE_PROMPT) -> dict[str, Any]:
    """Share of held-out images whose greedy description (answer to ``prompt``) names each true attribute value
    (and only it) in the right sentence: each subject's, left to right, then the setting's (the subjects'
    attributes averaged over the three positions)."""
    texts = generate_texts(model, tokenizer, images, prompt)
    hits: dict[str, list[bool]] = {k: [] for k in ATTRIBUTES}
    for text, r in zip(texts, records):
        named = described_subjects(text) + [{}] * (len(POSITIONS) + 1)
        for rank, k in enumerate(left_to_right(r["scene"])):
            for key in SUBJECT_ATTRIBUTES:
                hits[key].append(named[rank].get(key) == {r["subjects"][k][key]})
        for key in GLOBAL_ATTRIBUTES:
            hits[key].append(named[len(POSITIONS)].get(key) == {r["attributes"][key]})
    accuracy = {k: float(np.mean(v)) for k, v in hits.items()}
    return {"attributes": accuracy, "mean_accuracy": float(np.mean(list(accuracy.values()))),
            "distinct": len(set(texts)) / len(texts), "example": texts[0]}


def evaluate_critiques(model: nn.Module, tokenizer: Any, images: np.ndarray,
                       records: list[dict[str, Any]]) -> dict[str, Any]:
    """Greedy critiques of held-out images, image i asked about its (i mod 3)-th subject from the left, scored
    against that subject's and the global attributes (stages/report/attributes.py)."""
    from stages.report.attributes import attribute_scores

    texts: dict[int, str] = {}
    for rank, position in enumerate(POSITIONS):
        rows = list(range(rank, len(images), len(POSITIONS)))
        texts.update(zip(rows, generate_texts(model, tokenizer, images[rows], CRITIQUE_PROMPT.format(position))))
    texts = dict(sorted(texts.items()))
    scores = attribute_scores(texts, {i: subject_truth(r, i % len(POSITIONS)) for i, r in enumerate(records)})
    return {"macro_precision": scores["macro_precision"], "macro_recall": scores["macro_recall"],
            "distinct": len(set(texts.values())) / len(texts), "example": texts[0]}


def named_logprobs(model: nn.Module, tokenizer: Any, images: np.ndarray) -> dict[int, np.ndarray]:
    """image i -> its forced-choice phrasing scores (``forced_choice.image_logprobs``) after the prompt that names its
    (i mod 3)-th subject from the left, for a plain transformers InternVL or ours (scored on a copy in our class,
    which normalises the captioner's uint8 tiles; a plain one would read them raw)."""
    from PIL import Image

    from stages.families.internvl.captioner import InternVLCaptioner
    from stages.families.internvl.dataset import TileSpec
    from stages.families.internvl.model import (IASInternVLForConditionalGeneration, ias_config, tile_size,
                                                tokens_per_tile)
    from stages.report.forced_choice import image_logprobs

    ours = IASInternVLForConditionalGeneration(ias_config(model.config, fusion="none"))
    ours.load_state_dict(model.state_dict())  # strict: the same weights, nothing new
    spec = TileSpec(tile_size=tile_size(model.config), tokens_per_tile=tokens_per_tile(model.config))
    captioner = InternVLCaptioner(ours, tokenizer, spec, torch.device("cpu"))
    prompts = {i: CRITIQUE_PROMPT.format(POSITIONS[i % len(POSITIONS)]) for i in range(len(images))}
    return image_logprobs(captioner, [(i, Image.fromarray(image), None) for i, image in enumerate(images)],
                          prompts=prompts)


def evaluate_named_choice(model: nn.Module, tokenizer: Any, images: np.ndarray,
                          records: list[dict[str, Any]]) -> dict[str, float]:
    """The ladder's naming rung on held-out renders: forced choices on image i's (i mod 3)-th subject from the left,
    the prompt naming it (:func:`named_logprobs`), centred on the first half of the images and scored on the second
    against that subject's truth: {subject attribute: accuracy, "mean"}."""
    from stages.report.forced_choice import candidates, forced_choice_scores, forced_choices, prior

    logprobs = named_logprobs(model, tokenizer, images)
    half = len(images) // 2
    choices = forced_choices({i: logprobs[i] for i in range(half, len(images))}, candidates(tokenizer),
                             prior({i: logprobs[i] for i in range(half)}))
    scores = forced_choice_scores(choices, {i: subject_truth(records[i], i % len(POSITIONS)) for i in choices})
    return {**{k: scores["per_attribute"][k] for k in SUBJECT_ATTRIBUTES}, "mean": scores["accuracy"]}


def _train(model: nn.Module, params: list[nn.Parameter], images: np.ndarray, pad_id: int,
           batches: Iterator[list[tuple[int, Encoded]]], total: int, warmup: int, lr: float,
           weight_decay: float, desc: str, extra_loss: Callable[[Tensor], Tensor] | None = None) -> Iterator[float]:
    """AdamW with linear warmup then cosine over ``total`` batches of (image row, example), rows unique and
    ascending; ``extra_loss(rows)`` (after the forward) adds to the LM loss. Yields each step's LM loss."""
    from stages.families.internvl.collate import Collator

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = warmup_cosine(optimizer, total, warmup)
    collate = Collator(pad_id)
    recent: list[float] = []
    with tqdm(total=total, desc=desc, unit="step") as bar:
        for batch in batches:
            model.train()
            rows = torch.tensor([row for row, _ in batch])
            x = normalise(torch.from_numpy(images[rows.numpy()]))  # [b, 3, 224, 224]: one tile per image
            lm = model(**collate([{"input_ids": e.input_ids, "labels": e.labels, "pixel_values": x[j:j + 1],
                                   "saliency_map": None, "tile_grid": (1, 1, 0)}  # one tile, no saliency
                                  for j, (_, e) in enumerate(batch)])).loss
            loss = lm + extra_loss(rows) if extra_loss is not None else lm
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            recent = [*recent[-49:], lm.item()]
            bar.update()
            bar.set_postfix(caption_loss=f"{np.mean(recent):.3f}")
            yield recent[-1]


def patch_grid(config: Any) -> int:
    """Patches per side of the vision tower's tile."""
    return config.vision_config.image_size[0] // config.vision_config.patch_size[0]


@torch.no_grad()
def token_reading(model: nn.Module, dense: DenseHeads, images: np.ndarray, records: list[dict[str, Any]],
                  batch_size: int = 32) -> dict[str, float]:
    """Held-out: per subject attribute, how often the dense head reads a subject's value right from its patch tokens
    (``records`` carry their subject label maps, ``pretraining_corpus.validation_set``)."""
    grid, hits = patch_grid(model.config), []
    model.eval()
    for i in range(0, len(images), batch_size):
        chunk = records[i:i + batch_size]
        tokens = model.model.vision_tower(normalise(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size]))))
        labels = torch.from_numpy(np.stack([r["labels"] for r in chunk]))
        accuracy = dense.subject_accuracy(tokens.last_hidden_state[:, 1:], labels, grid, Targets.of(chunk))
        hits.append((accuracy, len(chunk)))
    return {k: sum(a[k] * n for a, n in hits) / sum(n for _, n in hits) for k in SUBJECT_ATTRIBUTES}


def _describe_phase(images: np.ndarray, labels: np.ndarray, records: list[dict[str, Any]],
                    val: tuple[np.ndarray, list[dict[str, Any]]], recipe: CaptionerRecipe,
                    corpus_seed: int) -> tuple[nn.Module, Any, list[dict[str, Any]]]:
    """Phase 1 from scratch: descriptions (``DESCRIBE_PROMPT``) + the dense and pooled auxiliary heads
    (stages/pretrain/targets.py) on the vision tower's patch tokens, ``epochs`` passes."""
    from stages.families.internvl.model import build_tiny_model, tokens_per_tile
    from stages.families.internvl.prompting import encode_example
    from stages.families.internvl.tokenizer import IMG_CONTEXT, train_bpe

    torch.manual_seed(recipe.seed)
    tokenizer = train_bpe(tokenizer_texts(records, corpus_seed), vocab_size=recipe.vocab_size)
    model = build_tiny_model(recipe.shape, vocab_size=len(tokenizer),
                             image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT), fusion="none")
    n_context = tokens_per_tile(model.config)
    encoded = [encode_example(tokenizer, n_context, describe(r), prompt=DESCRIBE_PROMPT) for r in records]
    targets = Targets.of(records)
    width, grid = model.config.vision_config.hidden_size, patch_grid(model.config)
    aux, dense = AuxHeads(width), DenseHeads(width)
    patches: list[Tensor] = []
    model.model.vision_tower.register_forward_hook(
        lambda m, i, o: patches.append(o.last_hidden_state[:, 1:]))  # patch tokens, no CLS: [B, grid^2, D]

    def aux_loss(rows: Tensor) -> Tensor:
        tokens, t = patches[-1], targets[rows]
        patches.clear()  # (generation during evaluation runs the hook too)
        cells = dense_targets(torch.from_numpy(labels[rows.numpy()]), t.subjects, grid)  # [B, grid^2, classes]
        return recipe.aux_weight * (dense.loss(tokens, cells) + aux.loss(tokens.mean(dim=1), t))

    generator = torch.Generator().manual_seed(recipe.seed)
    steps_per_epoch = math.ceil(len(images) / recipe.batch_size)
    batches = ([(i, encoded[i]) for i in idx.sort().values.tolist()]  # ascending rows read the memory map in order
               for _ in range(recipe.epochs)
               for idx in torch.randperm(len(images), generator=generator).split(recipe.batch_size))
    steps = _train(model, [*model.parameters(), *aux.parameters(), *dense.parameters()], images,
                   tokenizer.pad_token_id, batches,
                   recipe.epochs * steps_per_epoch, steps_per_epoch // 2, recipe.lr, recipe.weight_decay,
                   f"pretrain demo base, describe ({recipe.shape})", aux_loss)
    history = []
    for epoch in range(recipe.epochs):
        losses = [next(steps) for _ in range(steps_per_epoch)]
        record = {"epoch": epoch + 1, "caption_loss": float(np.mean(losses)), **evaluate(model, tokenizer, *val),
                  "token_reading": token_reading(model, dense, *val)}
        patches.clear()
        history.append(record)
        tqdm.write(f"pretrain demo base epoch {epoch + 1}: caption loss {record['caption_loss']:.3f}, held-out "
                   f"description accuracy " + " ".join(f"{k} {v:.2f}" for k, v in record["attributes"].items())
                   + f", distinct {record['distinct']:.2f}; tokens read (dense head) "
                   + " ".join(f"{k} {v:.2f}" for k, v in record["token_reading"].items()))
    steps.close()
    return model, tokenizer, history


def _critique_phase(model: nn.Module, tokenizer: Any, images: np.ndarray, records: list[dict[str, Any]],
                    val: tuple[np.ndarray, list[dict[str, Any]]],
                    recipe: CaptionerRecipe) -> tuple[list[float], list[dict[str, Any]]]:
    """Phase 2: ``critique_steps`` batches, each example with probability ``critique_share`` a critique of a random
    subject of its image remarking on each of its and the global attributes (``CRITIQUE_PROMPT`` naming the
    subject's position), else its description (``DESCRIBE_PROMPT``); held-out critiques are scored every
    ``critique_eval_every`` steps, greedy and by forced choice on the named subject (:func:`evaluate_named_choice`)."""
    from stages.families.internvl.model import tokens_per_tile
    from stages.families.internvl.prompting import encode_example

    n_context = tokens_per_tile(model.config)
    rng = np.random.default_rng(recipe.seed)
    torch.manual_seed(recipe.seed)

    def example(row: int) -> Encoded:
        r = records[row]
        if rng.random() < recipe.critique_share:
            rank = int(rng.integers(len(POSITIONS)))
            return encode_example(tokenizer, n_context, full_critique(rng, subject_truth(r, rank)),
                                  prompt=CRITIQUE_PROMPT.format(POSITIONS[rank]))
        return encode_example(tokenizer, n_context, describe(r), prompt=DESCRIBE_PROMPT)

    batches = ([(int(i), example(int(i))) for i in np.sort(rng.choice(len(images), recipe.batch_size, replace=False))]
               for _ in range(recipe.critique_steps))
    losses: list[float] = []
    history: list[dict[str, Any]] = []
    for loss in _train(model, list(model.parameters()), images, tokenizer.pad_token_id, batches,
                       recipe.critique_steps, max(1, recipe.critique_steps // 10), recipe.critique_lr,
                       recipe.weight_decay, f"pretrain demo base, critique ({recipe.shape})"):
        losses.append(loss)
        if len(losses) % recipe.critique_eval_every == 0 or len(losses) == recipe.critique_steps:
            history.append({"step": len(losses), "caption_loss": float(np.mean(losses[-recipe.critique_eval_every:])),
                            **evaluate_critiques(model, tokenizer, *val),
                            "named_choice": evaluate_named_choice(model, tokenizer, *val)})
            tqdm.write(f"pretrain demo base, critique step {len(losses)}: loss {history[-1]['caption_loss']:.3f}, "
                       f"held-out named-subject forced choice {history[-1]['named_choice']['mean']:.2f}, "
                       f"macro precision {history[-1]['macro_precision']:.2f}, "
                       f"distinct {history[-1]['distinct']:.2f}: {history[-1]['example']}")
    return losses, history


def describe_cache(recipe: CaptionerRecipe, n_images: int, corpus_seed: int) -> Path:
    """Where phase 1's model for this recipe and corpus is kept (a plain InternVL directory + describe.json)."""
    import hashlib

    from stages.synthetic.corpus import GENERATOR_VERSION

    key = hashlib.sha256(json.dumps({**recipe.describe_phase(), "n": n_images, "seed": corpus_seed,
                                     "generator_version": GENERATOR_VERSION, "phase": DESCRIBE_VERSION},
                                    sort_keys=True).encode()).hexdigest()[:12]
    return work_dir() / "pretrain" / f"base-describe-{key}"


def pretrain_captioner(images: np.ndarray, labels: np.ndarray, records: list[dict[str, Any]],
                       val: tuple[np.ndarray, list[dict[str, Any]]], recipe: CaptionerRecipe, out_dir: Path,
                       corpus_seed: int) -> dict[str, Any]:
    """Both phases on [N, 224, 224, 3] uint8 images + their [N, 224, 224] subject label maps + records (phase 1 from
    its cache when there); saves a plain InternVL ``-hf`` directory + tokenizer."""
    from transformers import InternVLForConditionalGeneration

    from stages.families.internvl.tokenizer import load_tokenizer
    from storage.atomic import write_json_atomic

    start = time.perf_counter()
    cache = describe_cache(recipe, len(images), corpus_seed)
    if not (cache / "describe.json").exists():
        model, tokenizer, history = _describe_phase(images, labels, records, val, recipe, corpus_seed)
        save_plain_internvl(model, tokenizer, cache)
        write_json_atomic(cache / "describe.json", {"history": history, "seconds": round(time.perf_counter() - start, 1)})
    describe = json.loads((cache / "describe.json").read_text())
    tqdm.write(f"pretrain demo base: phase 1 (describe) from {cache}")
    model = InternVLForConditionalGeneration.from_pretrained(str(cache), dtype=torch.float32)
    tokenizer = load_tokenizer(cache)
    t1 = time.perf_counter()
    losses, critique_history = _critique_phase(model, tokenizer, images, records, val, recipe)
    validation = {"describe": evaluate(model, tokenizer, *val, prompt=DESCRIBE_PROMPT),
                  "critique": critique_history[-1]}
    tqdm.write(f"pretrain demo base, phase 2: caption loss {np.mean(losses[:20]):.3f} -> {np.mean(losses[-20:]):.3f}; "
               f"held-out critiques: macro precision {validation['critique']['macro_precision']:.2f}, distinct "
               f"{validation['critique']['distinct']:.2f}; descriptions: mean accuracy "
               f"{validation['describe']['mean_accuracy']:.2f}")
    save_plain_internvl(model, tokenizer, out_dir)
    return {"recipe": asdict(recipe), "n_images": len(images), "history": describe["history"],
            "critique_history": critique_history,
            "validation": {**validation["describe"], "critique": validation["critique"]},
            "describe_seconds": describe["seconds"], "critique_seconds": round(time.perf_counter() - t1, 1),
            "train_seconds": round(describe["seconds"] + time.perf_counter() - t1, 1)}


def save_plain_internvl(model: nn.Module, tokenizer: Any, out_dir: Path) -> None:
    """Write the model as a plain transformers InternVL ``-hf`` directory (no IAS fields) + tokenizer, atomically."""
    import shutil

    from transformers import InternVLForConditionalGeneration
    from transformers.models.internvl.configuration_internvl import InternVLConfig

    fields = {k: v for k, v in model.config.to_dict().items()
              if k not in ("ias_fusion", "model_type", "transformers_version", "architectures")}
    plain = InternVLForConditionalGeneration(InternVLConfig(**fields))
    plain.load_state_dict(model.state_dict(), strict=True)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.replace(out_dir)
