"""The eleven caption metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap) and the SPICE family.

One call scores a whole prediction set: one PTB tokenizer JVM for candidates and references
together, one METEOR JVM (started first, so its start-up overlaps tokenisation, and run in a
thread concurrently with BLEU / ROUGE-L / CIDEr on the main thread) and, when the CoreNLP jars
are present, one SPICE JVM for all pairs running alongside. Every metric, SPICE included, scores
the PTB-tokenised text (as pycocoevalcap's COCOEvalCap does). Values equal pycocoevalcap's own.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path
from typing import Any, Hashable

from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.paths import work_dir
from stages.report import spice
from storage.atomic import write_bytes_atomic, write_json_atomic

# The metric columns, owned here: (header in the paper's layout, key in metrics.json). Tables, the report page
# and the study read them from this list; a new metric is added here and computed in score().
METRIC_COLUMNS = (
    ("B1", "Bleu_1"), ("B2", "Bleu_2"), ("B3", "Bleu_3"), ("B4", "Bleu_4"), ("M", "METEOR"), ("R", "ROUGE_L"),
    ("C", "CIDEr"), ("S", "SPICE"), ("S-L", "SPICE_L"), ("Pre", "Precision"), ("Re", "Recall"),
)
METRIC_KEYS = tuple(key for _, key in METRIC_COLUMNS)
METRIC_HEADERS = {key: header for header, key in METRIC_COLUMNS}
SPICE_KEYS = ("SPICE", "SPICE_L", "Precision", "Recall")
SCORER_VERSION = "2"  # bump when scoring changes, so cached metrics.json files are rescored
JAVA_HELP = (
    "java not found on PATH: BLEU/METEOR/ROUGE-L/CIDEr use pycocoevalcap's Java tools (PTB tokenizer, METEOR 1.5). "
    "Install a Java runtime (>= 8), e.g. `apt-get install -y default-jre-headless` (Debian/Ubuntu), "
    "`dnf install java-17-openjdk-headless` (Fedora), `brew install openjdk` (macOS) or "
    "`conda install -c conda-forge openjdk`, then check `java -version`."
)

Scores = dict[str, float | None]


class JavaNotFoundError(PipelineError):
    """No ``java`` executable: the message says how to install one."""


def _check_inputs(candidates: dict[Hashable, str], references: dict[Hashable, list[str]]) -> None:
    if not candidates:
        raise ValueError("no candidates to score")
    missing = [i for i in candidates if not references.get(i)]
    if missing:
        raise ValueError(f"{len(missing)} candidate image(s) have no references, e.g. {missing[:5]}")


def _one_line(text: str) -> str:
    """The PTB tokenizer works line by line: any line break inside a sentence would shift all rows."""
    return " ".join(str(text).split())


def _tokenize(candidates: dict[Hashable, str], references: dict[Hashable, list[str]]) -> tuple[dict, dict]:
    """One PTB tokenizer call for both sides -> (gts, res) as pycocoevalcap's scorers expect them."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    joint: dict[tuple[int, Hashable], list[dict[str, str]]] = {}
    for i, (image_id, caption) in enumerate(candidates.items()):
        joint[(0, i)] = [{"caption": _one_line(caption)}]
        joint[(1, i)] = [{"caption": _one_line(r)} for r in references[image_id]]
    tokens = PTBTokenizer().tokenize(joint)
    ids = list(candidates)
    gts = {image_id: tokens[(1, i)] for i, image_id in enumerate(ids)}
    res = {image_id: tokens[(0, i)] for i, image_id in enumerate(ids)}
    return gts, res


class _MeteorThread(threading.Thread):
    """METEOR on the tokenised set in a thread: the JVM does the work on the other core."""

    def __init__(self, meteor: Any, gts: dict, res: dict):
        super().__init__(daemon=True)
        self.meteor, self.gts, self.res = meteor, gts, res
        self.result: tuple[float, list[float]] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.meteor.compute_score(self.gts, self.res)
        except BaseException as e:  # re-raised on the main thread
            self.error = e
        finally:
            self.meteor.meteor_p.stdin.close()
            self.meteor.meteor_p.wait()


def score(
    candidates: dict[Hashable, str],
    references: dict[Hashable, list[str]],
    *,
    spice_lib: Path | None = None,
    progress: bool = True,
) -> tuple[Scores, dict[Hashable, Scores], dict[str, str]]:
    """Score ``candidates`` (image id -> caption) against ``references`` (image id -> captions).

    Returns (corpus scores keyed by :data:`METRIC_KEYS`, per-image scores, notes). SPICE-family
    values are ``None`` when SPICE cannot run; ``notes`` then gives the reason and the fix.
    References of images without a candidate are ignored.
    """
    _check_inputs(candidates, references)
    if shutil.which("java") is None:
        raise JavaNotFoundError(JAVA_HELP)
    references = {i: [_one_line(r) for r in references[i]] for i in candidates}
    candidates = {i: _one_line(c) for i, c in candidates.items()}
    notes: dict[str, str] = {}
    lib = spice.find_spice_lib(spice_lib)
    if lib.lib is None:
        notes.update({k: lib.reason for k in SPICE_KEYS})
    corpus, per_image = _score_all(candidates, references, lib.lib, progress)
    return corpus, per_image, notes


def _score_all(
    candidates: dict[Hashable, str], references: dict[Hashable, list[str]], spice_lib: Path | None, progress: bool,
) -> tuple[Scores, dict[Hashable, Scores]]:
    """Tokenise once; SPICE (when it can run) and METEOR in their JVMs alongside BLEU / ROUGE-L / CIDEr."""
    from pycocoevalcap.meteor.meteor import Meteor

    bar = tqdm(total=6, desc="scoring", unit="step", disable=not progress)
    meteor = Meteor()  # the JVM loads its paraphrase table while we tokenise
    bar.set_postfix_str("tokenize")
    spice_run = None
    try:
        gts, res = _tokenize(candidates, references)
        if spice_lib is not None:  # SPICE scores the tokenised text too, as in pycocoevalcap's COCOEvalCap
            spice_run = spice.SpiceRun(spice_lib, {i: c[0] for i, c in res.items()}, gts,
                                       cache_dir=work_dir() / "cache" / "spice")
    except BaseException:
        meteor.meteor_p.stdin.close()  # the thread that would close it never starts
        meteor.meteor_p.wait()
        raise
    bar.update()
    meteor_thread = _MeteorThread(meteor, gts, res)
    meteor_thread.start()
    try:
        return _score_tokenised(gts, res, meteor_thread, spice_run, bar)
    except BaseException:
        if spice_run is not None:
            spice_run.close()  # no orphaned JVM or temp files when another metric fails
        raise
    finally:
        bar.close()


def _score_tokenised(
    gts: dict, res: dict, meteor_thread: _MeteorThread, spice_run: spice.SpiceRun | None, bar: tqdm,
) -> tuple[Scores, dict[Hashable, Scores]]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    candidates = list(res)
    corpus: Scores = {k: None for k in METRIC_KEYS}
    per_image: dict[Hashable, Scores] = {i: {k: None for k in METRIC_KEYS} for i in candidates}

    def put(key: str, total: float, each: Any) -> None:
        corpus[key] = float(total)
        for image_id, value in zip(candidates, each):
            per_image[image_id][key] = float(value)

    for name, scorer in (("BLEU", Bleu(4)), ("ROUGE_L", Rouge()), ("CIDEr", Cider())):
        bar.set_postfix_str(name)
        if name == "BLEU":
            totals, each = scorer.compute_score(gts, res, verbose=0)
            for n in range(4):
                put(f"Bleu_{n + 1}", totals[n], each[n])
        else:
            total, each = scorer.compute_score(gts, res)
            put(name, total, each)
        bar.update()

    bar.set_postfix_str("METEOR")
    meteor_thread.join()
    if meteor_thread.error is not None:
        raise RuntimeError(f"METEOR failed: {meteor_thread.error!r}") from meteor_thread.error
    put("METEOR", *meteor_thread.result)
    bar.update()

    bar.set_postfix_str("SPICE")
    if spice_run is not None:
        spice_corpus, spice_each = spice.select(spice.parse_output(spice_run.wait()), res, gts)
        corpus.update(spice_corpus)
        for image_id, values in spice_each.items():
            per_image[image_id].update(values)
    bar.update()
    return corpus, per_image


def fingerprint(candidates: dict[Hashable, str], references: dict[Hashable, list[str]], spice_lib: Path | None) -> str:
    """Hash of everything a score depends on: inputs, scorer version and whether SPICE can run."""
    payload = {
        "version": SCORER_VERSION,
        "spice": str(spice.find_spice_lib(spice_lib).lib),
        "items": [[str(i), candidates[i], list(references.get(i, []))] for i in candidates],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def per_image_path(out: Path) -> Path:
    """The per-image side file beside ``out``: ``per_image.jsonl`` (``<stem>.per_image.jsonl`` for other names)."""
    return out.with_name("per_image.jsonl" if out.name == "metrics.json" else f"{out.stem}.per_image.jsonl")


def score_to_file(
    out: Path,
    candidates: dict[Hashable, str],
    references: dict[Hashable, list[str]],
    *,
    spice_lib: Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> tuple[dict[str, Any], bool]:
    """Score and write ``out`` (metrics.json) plus the per-image side file, atomically.

    Incremental: when ``out`` already holds the scores of exactly these inputs it is returned
    unchanged. (Per-image reuse would be wrong: corpus BLEU and METEOR aggregate n-gram / alignment
    statistics over the whole set.) Returns (the metrics.json content, whether it was rescored)."""
    references = {i: references[i] for i in candidates if i in references}
    key = fingerprint(candidates, references, spice_lib)
    if out.exists() and per_image_path(out).exists() and not force:
        cached = json.loads(out.read_text())
        if cached.get("fingerprint") == key:
            return cached, False
    corpus, per_image, notes = score(candidates, references, spice_lib=spice_lib, progress=progress)
    lines = [json.dumps({"image_id": i, **v}) for i, v in per_image.items()]
    write_bytes_atomic(per_image_path(out), ("\n".join(lines) + "\n").encode())
    result = {**corpus, "notes": notes, "n_images": len(per_image), "fingerprint": key}
    write_json_atomic(out, result)
    return result, True
