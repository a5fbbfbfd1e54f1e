"""Benchmark: scoring 10,000 candidates × 5 references with BLEU / METEOR / ROUGE-L / CIDEr.

Compares ``stages.report.metrics.score`` with (a) pycocoevalcap called once per metric on the
whole set, sequentially (the anchor: ~37 s on one core of this CPU class), and (b) pycocoevalcap called per image
(tokenizer + four scorers, a new METEOR JVM each time), whose cost is extrapolated from a
sample of ``--sample`` images. Sentences are real PCCD critiques from ../shared (without them, or
without ``java``, it says so and exits 0).

    .venv/bin/python -m tests.bench.metrics [--n 10000] [--sample 10] [--shared ../shared]
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # noqa: E402

from pipeline.bench import skip  # noqa: E402
from stages.report.metrics import score  # noqa: E402

SHARED = Path(__file__).resolve().parents[3] / "shared"
PCCD = Path("data") / "pccd_guru_validation.json"  # inside SHARED
ASPECTS = ("general_impression", "subject_of_photo", "composition", "use_of_camera", "depth_of_field",
           "color_lighting", "focus")


def make_set(sentences: Path, n: int, n_refs: int = 5, seed: int = 0) -> tuple[dict[str, str], dict[str, list[str]]]:
    records = json.loads(sentences.read_text())
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
    ap.add_argument("--shared", type=Path, default=SHARED, help="the read-only oracle data (default ../shared)")
    args = ap.parse_args()
    if shutil.which("java") is None:
        skip("java not found on PATH (pycocoevalcap's tokenizer and METEOR run on Java)")
    if not (args.shared / PCCD).is_file():
        skip(f"needs real PCCD sentences at {args.shared / PCCD} (the read-only ../shared beside the checkout)")
    cands, refs = make_set(args.shared / PCCD, args.n)

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
