"""``ase-mllm bench``: run the benchmark scripts in ``tests/bench/`` one after another."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import typer

BENCH_DIR = Path("tests/bench")


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
        for script in chosen:
            typer.secho(f"== {script.stem}", bold=True)
            t0 = time.perf_counter()
            if subprocess.run([sys.executable, str(script)], check=False).returncode != 0:
                failed.append(script.stem)
            typer.echo(f"   ({time.perf_counter() - t0:.0f} s)")
        typer.echo(f"bench: {len(chosen) - len(failed)}/{len(chosen)} benchmarks ran" +
                   (f"; failed: {', '.join(failed)}" if failed else ""))
        if failed:
            raise typer.Exit(1)
