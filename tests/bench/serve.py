"""Benchmark: one critique of a demo image through the app's entry against the same through ``caption``.

The app's entry is what ``ase-mllm serve`` runs for a ``/critique`` request (``App.critique_file``: read the
photo, its EAT map, the critique, the overlay); ``caption``'s path is ``write_captions`` (read, critique, overlay
PNG, captions.jsonl / .csv, index.html). Both run in this process with the same run loaded once, alternated after
a warm-up, median of ``--repeats``, and give the same critique (checked): the ratio app / caption (aim <= 1.1)
says the app adds no inference path or cost of its own. For context it then starts ``ase-mllm serve`` on a free
port and times the same request through gradio_client (upload, queue, answer, overlay download), a fixed cost
per request that a tiny demo model's critique does not hide. Needs ``make demo`` (skipped without it).
Usage: python tests/bench/serve.py [--repeats 7] [--run DATASET/RUN]
"""
from __future__ import annotations

import argparse
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.bench import skip  # noqa: E402


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternated(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, the functions taking turns."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def served(dataset: str, run: str) -> tuple[subprocess.Popen, str, float]:
    """``ase-mllm serve`` on a free port: (process, url, seconds until it answered)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--dataset", dataset, "--run-name", run,
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.perf_counter()
    while time.perf_counter() - start < 180 and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return proc, url, time.perf_counter() - start
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"serve did not answer (exit {proc.poll()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--run", default="demo/demo-ias", help="DATASET/RUN (default: the demo's IASC run)")
    args = parser.parse_args()
    from pipeline.context import manifest
    from pipeline.paths import runs_dir
    from stages.report.app import App
    from stages.report.caption import write_captions
    from stages.report.critique import Critic, EatSaliency
    from stages.report.generate import split_images
    from stages.report.known_truth import KnownTruth
    from storage.images import safe_join
    from storage.tables import image_root

    dataset, run = args.run.split("/", 1)
    if not (runs_dir(dataset) / run).is_dir():
        skip(f"no run {args.run} under {runs_dir(dataset).parent}: run `make demo` first")
    row = split_images(dataset, "test", limit=1).to_pylist()[0]
    photo = safe_join(image_root(dataset), row["path"])
    critic = Critic.load(EatSaliency(manifest()), dataset, run)
    app = App(critic, None, KnownTruth(dataset), [])
    with tempfile.TemporaryDirectory(prefix="ase-bench-serve-") as out:
        def entry() -> str:
            return app.critique_file(photo, None)[3]

        def caption() -> str:
            return write_captions(critic, [photo], Path(out), progress=False).rows[0].critique

        assert entry() == caption(), "the app's entry and caption disagree"  # also the warm-up
        t = alternated({"app": entry, "caption": caption}, args.repeats)
    print(f"one critique of {row['image_id']} with {args.run}, median of {args.repeats}: app's entry "
          f"{t['app'] * 1000:.0f} ms, caption {t['caption'] * 1000:.0f} ms")
    print(f"app / caption: {t['app'] / t['caption']:.2f}x (aim <= 1.1)")

    from gradio_client import Client, handle_file

    proc, url, ready_s = served(dataset, run)
    try:
        client = Client(url, verbose=False)
        request = lambda: client.predict(handle_file(str(photo)), None, api_name="/critique")  # noqa: E731
        assert request()[3] == entry(), "the served app and its entry disagree"
        over_http = statistics.median(timed(request) for _ in range(args.repeats))
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    print(f"through HTTP (serve answered after {ready_s:.1f} s): {over_http * 1000:.0f} ms a request, "
          f"{over_http / t['caption']:.2f}x caption ({(over_http - t['app']) * 1000:.0f} ms of Gradio per request)")


if __name__ == "__main__":
    main()
