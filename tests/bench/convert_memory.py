"""convert-base memory benchmark: peak RSS while converting InternVL2-8B-shaped checkpoints of two sizes.

Synthetic original checkpoints with the real InternVL2-8B tensor shapes (InternViT-300M, InternLM2 7B layers:
4096 wide, 32 heads / 8 KV heads, MLP 14336, vocab 92553; random bf16 in 1 GiB safetensors shards), with
``SMALL`` and ``LARGE`` LLM layers. Each is converted in a fresh process; its peak RSS (its own VmHWM) is
printed beside the checkpoint size, the largest single tensor and the RSS of a process that only imports the
converter. Streaming keeps the peak at about the import baseline + the largest tensor, whatever the model size
(the full 32-layer 8B, 16.2 GB, has the same largest tensor). Run: ``.venv/bin/python tests/bench/convert_memory.py``
(needs ~2 x the LARGE checkpoint in free disk under $TMPDIR; ``ASE_BENCH_CONVERT_LAYERS=2,8`` changes the sizes).
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from test_convert_base import internvl2_config, make_original_checkpoint, original_shapes  # noqa: E402

SMALL, LARGE = (int(n) for n in os.environ.get("ASE_BENCH_CONVERT_LAYERS", "2,8").split(","))
# the child reports its own VmHWM: rusage's ru_maxrss would include the parent's pages from before exec
PEAK = "print('VmHWM', open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
IMPORT_ONLY = "import stages.families.internvl.convert\n" + PEAK
CONVERT = """
import sys
from stages.families.internvl.convert import convert
print(convert(sys.argv[1], sys.argv[2], show_progress=False).line())
""" + PEAK


def peak_rss(code: str, *args: str) -> tuple[float, float]:
    """(peak RSS in bytes, seconds) of ``python -c code args`` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the measured process failed: {done.stderr[-2000:]}")
    print(*done.stdout.splitlines()[:-1], sep="\n")
    return int(done.stdout.split("VmHWM")[-1]) * 1024, time.perf_counter() - start


def main() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="ase-bench-convert-"))
    gib = 1024**3
    try:
        baseline, _ = peak_rss(IMPORT_ONLY)
        rows = []
        for layers in (SMALL, LARGE):
            config = internvl2_config(llm_layers=layers)
            largest = max(2 * math.prod(s) for s in original_shapes(config).values())
            src, out = scratch / f"src{layers}", scratch / f"out{layers}"
            size = make_original_checkpoint(src, config)
            rss, seconds = peak_rss(CONVERT, str(src), str(out))
            rows.append((layers, size, largest, rss, seconds))
            shutil.rmtree(src)
            shutil.rmtree(out)
        print(f"import-only process: peak RSS {baseline / gib:.2f} GiB")
        print("| LLM layers | checkpoint | largest tensor | peak RSS | peak RSS - import | RSS / checkpoint | time |")
        for layers, size, largest, rss, seconds in rows:
            print(f"| {layers} | {size / gib:.2f} GiB | {largest / gib:.2f} GiB | {rss / gib:.2f} GiB | "
                  f"{(rss - baseline) / gib:.2f} GiB | {rss / size:.2f} | "
                  f"{seconds:.0f} s ({size / seconds / 2**20:.0f} MiB/s) |")
        (_, small, _, rss_small, _), (_, large, _, rss_large, _) = rows
        print(f"checkpoint {large / small:.2f}x larger -> peak RSS {rss_large / rss_small:.2f}x (aim: ~1, streaming)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
