"""Benchmarks that cannot run here say why and exit 0 (like skipped tests); the runner counts them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "ASE_WORK": str(tmp_path / "work")}
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_metrics_bench_without_shared_data_says_why_and_exits_0(tmp_path: Path) -> None:
    done = _run(["tests/bench/metrics.py", "--shared", str(tmp_path / "no_shared")], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "metrics: skipped: needs real PCCD sentences at" in done.stdout and str(tmp_path / "no_shared") in done.stdout
    assert "Traceback" not in done.stderr


def test_runner_counts_a_bench_without_java_as_skipped(tmp_path: Path) -> None:
    empty = tmp_path / "bin"  # a PATH without java (python is called by its full path)
    empty.mkdir()
    done = _run(["-m", "pipeline", "bench", "metrics"], tmp_path, path=str(empty))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "metrics: skipped: java not found on PATH" in done.stdout
    assert "bench: 0/1 benchmarks ran; skipped: metrics: java not found" in done.stdout
