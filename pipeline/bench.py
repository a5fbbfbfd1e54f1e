"""``ase-mllm bench``: run the benchmark scripts in ``tests/bench/`` one after another.

A script that cannot run here (oracle data in ``../shared`` absent, no ``java``, no GPU for
``--device cuda``, an optional package missing) calls :func:`skip`: it says why and exits 0, like a
skipped test, and the runner counts it as skipped.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

import typer

BENCH_DIR = Path("tests/bench")
SKIP_LOG_ENV = "ASE_BENCH_SKIP_LOG"  # set by the runner: skipped scripts append their reason there


def skip(reason: str) -> NoReturn:
    """End a benchmark that cannot run here: print why and exit 0."""
    name = Path(sys.argv[0]).stem
    print(f"{name}: skipped: {reason}", flush=True)
    if log := os.environ.get(SKIP_LOG_ENV):
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"{name}: {reason}\n")
    raise SystemExit(0)


def require_device(device: str) -> None:
    """Skip unless ``device`` (e.g. "cpu", "cuda:1") exists here."""
    import torch

    kind = torch.device(device)
    if kind.type == "cuda" and (not torch.cuda.is_available() or (kind.index or 0) >= torch.cuda.device_count()):
        skip(f"--device {device}: no such CUDA device here (torch sees {torch.cuda.device_count()}); use --device cpu")


def register(app: typer.Typer) -> None:
    @app.command()
    def bench(
        names: list[str] = typer.Argument(None, help="Benchmarks to run (file stems); default all."),
    ) -> None:
        """Run the speed benchmarks (each prints ratios measured side by side in one run)."""
        scripts = sorted(BENCH_DIR.glob("*.py"))
        if not scripts:
            raise typer.BadParameter(f"no benchmarks under {BENCH_DIR}: run from the repository root")
        chosen = [s for s in scripts if not names or s.stem in names]
        failed = []
        with tempfile.TemporaryDirectory(prefix="ase-bench-") as tmp:
            log = Path(tmp) / "skipped.txt"
            env = {**os.environ, SKIP_LOG_ENV: str(log)}
            for script in chosen:
                typer.secho(f"== {script.stem}", bold=True)
                t0 = time.perf_counter()
                if subprocess.run([sys.executable, str(script)], check=False, env=env).returncode != 0:
                    failed.append(script.stem)
                typer.echo(f"   ({time.perf_counter() - t0:.0f} s)")
            skipped = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
        ran = len(chosen) - len(failed) - len(skipped)
        typer.echo(f"bench: {ran}/{len(chosen)} benchmarks ran" +
                   (f"; skipped: {'; '.join(skipped)}" if skipped else "") +
                   (f"; failed: {', '.join(failed)}" if failed else ""))
        if failed:
            raise typer.Exit(1)
