"""Benchmark: scoring 10,000 candidates × 5 references with BLEU / METEOR / ROUGE-L / CIDEr.

Compares ``stages.report.metrics.score`` with (a) pycocoevalcap called once per metric on the
whole set, sequentially (DESIGN.md's 37 s anchor), and (b) pycocoevalcap called per image
(tokenizer + four scorers, a new METEOR JVM each time), whose cost is extrapolated from a
sample of ``--sample`` images. Sentences are real PCCD critiques from ../shared.

    .venv/bin/python -m tests.bench.metrics [--n 10000] [--sample 10]
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from stages.report.metrics import score

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "pccd_guru_validation.json"
ASPECTS = ("general_impression", "subject_of_photo", "composition", "use_of_camera", "depth_of_field",
           "color_lighting", "focus")


def make_set(n: int, n_refs: int = 5, seed: int = 0) -> tuple[dict[str, str], dict[str, list[str]]]:
    records = json.loads(SHARED.read_text())
    pool = [" ".join(r[a].split()) for r in records for a in ASPECTS if r.get(a)]
    rng = random.Random(seed)
    cands = {f"im{i}": rng.choice(pool) for i in range(n)}
    refs = {i: rng.sample(pool, n_refs) for i in cands}
    return cands, refs


def pycocoevalcap_whole(cands: dict[str, str], refs: dict[str, list[str]]) -> float:
    t = time.perf_counter()
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": r} for r in refs[i]] for i in cands})
    res = tok.tokenize({i: [{"caption": c}] for i, c in cands.items()})
    Bleu(4).compute_score(gts, res, verbose=0)
    for scorer in (Meteor(), Rouge(), Cider()):
        scorer.compute_score(gts, res)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--sample", type=int, default=10)
    args = ap.parse_args()
    cands, refs = make_set(args.n)

    t = time.perf_counter()
    score(cands, refs, progress=False)
    ours = time.perf_counter() - t
    print(f"ours (score, METEOR concurrent): {ours:.1f} s for {args.n} x 5")

    whole = pycocoevalcap_whole(cands, refs)
    print(f"pycocoevalcap whole set, sequential: {whole:.1f} s  -> ours / sequential = {ours / whole:.2f}")

    sample = list(cands)[: args.sample]
    t = time.perf_counter()
    for i in sample:
        pycocoevalcap_whole({i: cands[i]}, {i: refs[i]})
    per_image = (time.perf_counter() - t) / len(sample)
    extrapolated = per_image * args.n
    print(f"pycocoevalcap per image: {per_image:.2f} s/image over a {len(sample)}-image sample, "
          f"extrapolated to {args.n}: {extrapolated:.0f} s -> speed-up {extrapolated / ours:.0f}x")


if __name__ == "__main__":
    main()
