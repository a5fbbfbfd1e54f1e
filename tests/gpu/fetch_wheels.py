"""Fetch, once, the wheels ``tests/gpu/run.sh`` installs on a GPU machine that reaches no package index.

    python tests/gpu/fetch_wheels.py [--python 3.12] [--dest tests/gpu/wheels]

Downloads exactly the pinned requirements of ``tests/gpu/wheels.txt`` (those whose marker applies to the target
Python) as manylinux x86_64 wheels for that Python, with ``pip download --no-deps``, removes any other wheel from
``--dest`` (two versions of one package would stop the install) and prints the folder's size, which must stay under
the 64 MiB a working tree may carry. ``run.sh`` installs whatever it finds there.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

HERE = Path(__file__).resolve().parent
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
LIMIT = 64 * 2**20


def pinned(python: str, listing: Path = HERE / "wheels.txt") -> list[Requirement]:
    """The pinned requirements of ``listing`` that apply to Python ``python`` (e.g. "3.12")."""
    env = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython"}
    lines = (line.split("#")[0].strip() for line in listing.read_text().splitlines())
    reqs = [Requirement(line) for line in lines if line]
    bad = [str(r) for r in reqs if len(r.specifier) != 1 or next(iter(r.specifier)).operator != "=="]
    if bad:
        raise SystemExit(f"{listing}: every line must pin one version (name==version), not {bad}")
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python (major.minor)")
    parser.add_argument("--dest", type=Path, default=HERE / "wheels")
    args = parser.parse_args()
    reqs = pinned(args.python)
    args.dest.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    args.python, "--implementation", "cp", *platforms, "-d", str(args.dest),
                    *(f"{r.name}{r.specifier}" for r in reqs)], check=True)
    wanted = {(canonicalize_name(r.name), next(iter(r.specifier)).version) for r in reqs}
    size = 0
    for wheel in sorted(args.dest.glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(wheel.name)
        cp = f"cp{args.python.replace('.', '')}"
        fits = any(t.interpreter in (cp, "py3", "py2") or t.abi == "abi3" for t in tags)  # this Python's build
        if (name, str(version)) not in wanted or not fits:
            wheel.unlink()  # another version or another Python's build: run.sh installs every wheel it finds
            continue
        size += wheel.stat().st_size
    found = {parse_wheel_filename(w.name)[0] for w in args.dest.glob("*.whl")}
    missing = sorted(n for n, _ in wanted if n not in found)
    print(f"fetch_wheels: {len(found)} wheels for Python {args.python} in {args.dest}, {size / 2**20:.1f} MiB"
          + (f"; MISSING {missing}" if missing else ""))
    if missing or size > LIMIT:
        raise SystemExit(1 if missing else f"fetch_wheels: {size / 2**20:.1f} MiB is over the 64 MiB a tree may carry")


if __name__ == "__main__":
    main()
