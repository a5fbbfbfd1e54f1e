"""SPICE and the per-reference SPICE family (SPICE-L, Precision, Recall) via the official jar.

SPICE (Anderson et al. 2016) needs Stanford CoreNLP 3.6.0 jars that cannot be downloaded on
every machine, so this module finds them or says exactly why not; it never estimates.

SPICE-L / Precision / Recall (Chang et al., ICCV 2017, as the ASE-MLLM paper defines them): SPICE
between the candidate and each single reference; per image SPICE-L is the highest F over the
references, Precision the highest tuple precision and Recall the highest tuple recall, each chosen
separately (three possibly different references); each is then averaged over images.

One JVM call scores everything: per image one entry against all references (id
``f"{image_id}#all"``, plain SPICE) and one entry per single reference (``f"{image_id}#{j}"``).
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable

import pycocoevalcap.spice

CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
SPICE_DIR = Path(pycocoevalcap.spice.__file__).parent
SPICE_JAR = SPICE_DIR / "spice-1.0.jar"
ENV_LIB = "ASE_SPICE_LIB"
CORENLP_URL = "http://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip"


@dataclass(frozen=True)
class SpiceLib:
    """Where the CoreNLP jars were found (``lib``), or why SPICE cannot run (``reason``)."""

    lib: Path | None
    reason: str = ""


def find_spice_lib(configured: Path | None = None) -> SpiceLib:
    """Look for the CoreNLP 3.6.0 jars: ``configured``, then ``$ASE_SPICE_LIB``, then pycocoevalcap's lib."""
    candidates = [Path(p) for p in (configured, os.environ.get(ENV_LIB)) if p] + [SPICE_DIR / "lib"]
    for directory in candidates:
        if all((directory / jar).is_file() for jar in CORENLP_JARS):
            return SpiceLib(directory)
    searched = ", ".join(str(d) for d in candidates)
    return SpiceLib(
        None,
        f"SPICE needs {' and '.join(CORENLP_JARS)} (not found in {searched}). "
        f"Fix: unzip them from {CORENLP_URL} into {SPICE_DIR / 'lib'} or any directory "
        f"named by ${ENV_LIB} / --spice-lib.",
    )


def java_major_version(java: str = "java") -> int:
    """Major version of the ``java`` on PATH (8 for ``1.8.0_x``)."""
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=True).stderr
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not m:
        raise RuntimeError(f"cannot parse `java -version` output: {out!r}")
    major, minor = int(m.group(1)), int(m.group(2) or 0)
    return minor if major == 1 else major


def spice_command(lib: Path, in_file: Path, out_file: Path, cache_dir: Path | None, java_version: int) -> list[str]:
    """The java command line. The LMDB cache breaks on Java >= 16 (FST serializer), so it is left out there."""
    classpath = os.pathsep.join([str(SPICE_JAR), str(SPICE_DIR / "lib" / "*"), str(lib / "*")])
    cmd = ["java", "-Xmx8G", "-cp", classpath, "edu.anu.spice.SpiceScorer", str(in_file), "-out", str(out_file)]
    if cache_dir is not None and java_version < 16:
        cmd += ["-cache", str(cache_dir)]
    return cmd + ["-subset", "-silent"]


def build_input(candidates: dict[Hashable, str], references: dict[Hashable, list[str]]) -> list[dict[str, Any]]:
    """SPICE input rows: per image one all-references entry and one entry per single reference."""
    rows: list[dict[str, Any]] = []
    for image_id, caption in candidates.items():
        refs = references[image_id]
        rows.append({"image_id": f"{image_id}#all", "test": caption, "refs": list(refs)})
        rows += [{"image_id": f"{image_id}#{j}", "test": caption, "refs": [ref]} for j, ref in enumerate(refs)]
    return rows


class SpiceRun:
    """One background JVM scoring all SPICE entries; start it early, ``wait()`` for the parsed output."""

    def __init__(
        self,
        lib: Path,
        candidates: dict[Hashable, str],
        references: dict[Hashable, list[str]],
        cache_dir: Path | None = None,
    ):
        self._tmp = tempfile.TemporaryDirectory(prefix="ase-spice-")
        tmp = Path(self._tmp.name)
        self._in, self._out = tmp / "in.json", tmp / "out.json"
        self._in.write_text(json.dumps(build_input(candidates, references)))
        cmd = spice_command(lib, self._in, self._out, cache_dir, java_major_version())
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait(self) -> list[dict[str, Any]]:
        _, err = self._proc.communicate()
        try:
            if self._proc.returncode != 0:
                raise RuntimeError(f"SPICE failed (exit {self._proc.returncode}): {err.decode()[-2000:]}")
            return json.loads(self._out.read_text())
        finally:
            self._tmp.cleanup()

    def close(self) -> None:
        """Stop the JVM (when still running) and remove its files: for when scoring fails elsewhere."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc.stderr.close()
        self._tmp.cleanup()


def _num(value: Any) -> float:
    """SPICE writes NaN (no tuples) or null for undefined ratios: those count as 0."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return 0.0
    return 0.0 if math.isnan(x) else x


def parse_output(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """SPICE output entries -> {entry id: {"pr", "re", "f"}} from each entry's ``scores["All"]``."""
    return {str(r["image_id"]): {k: _num(r["scores"]["All"][k]) for k in ("pr", "re", "f")} for r in results}


def select(
    parsed: dict[str, dict[str, float]], candidates: dict[Hashable, str], references: dict[Hashable, list[str]]
) -> tuple[dict[str, float], dict[Hashable, dict[str, Any]]]:
    """Corpus SPICE / SPICE_L / Precision / Recall and per-image values.

    Per image: SPICE_L, Precision and Recall are the maxima of the single-reference F, precision and
    recall, each over all references independently; ``*_reference`` name the index that gave each
    (the first on ties)."""
    per_image: dict[Hashable, dict[str, Any]] = {}
    for image_id in candidates:
        pairs = [parsed[f"{image_id}#{j}"] for j in range(len(references[image_id]))]

        def best(key: str) -> int:
            return max(range(len(pairs)), key=lambda j: (pairs[j][key], -j))

        f, pr, re = best("f"), best("pr"), best("re")
        per_image[image_id] = {
            "SPICE": parsed[f"{image_id}#all"]["f"],
            "SPICE_L": pairs[f]["f"],
            "Precision": pairs[pr]["pr"],
            "Recall": pairs[re]["re"],
            "spice_best_reference": f,
            "precision_best_reference": pr,
            "recall_best_reference": re,
        }
    n = max(len(per_image), 1)
    corpus = {k: sum(v[k] for v in per_image.values()) / n for k in ("SPICE", "SPICE_L", "Precision", "Recall")}
    return corpus, per_image
