#!/usr/bin/env bash
# tests/gpu/run.sh [--tiny]: stage 1 / stage 2 / generation speed on one GPU within 5 minutes, on a machine as it
# is: wheels fetched once by tests/gpu/fetch_wheels.py into tests/gpu/wheels/ (copied along with the checkout) are
# installed with --no-index into a temp folder first; a preflight then records what is missing or too old. The
# clock starts here; phases are boxed by wall clock (run.py BUDGETS) and everything stops at 300 s (--tiny: tiny
# shapes and a few images on CPU, for CI). Numbers: $OUT/gpu_check.json (else work/), rewritten after each phase,
# and $OUT/gpu_check.log (each phase's last lines); scratch goes to a temp folder, removed at the end.
set -uo pipefail
started=$(date +%s.%N)
cd "$(dirname "$0")/../.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
scratch=$(mktemp -d "${TMPDIR:-/tmp}/ase-gpu-check.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
wheels=("${ASE_GPU_WHEELS:-tests/gpu/wheels}"/*.whl)
if [ -e "${wheels[0]}" ]; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$scratch/site" "${wheels[@]}" \
      > "$scratch/pip.log" 2>&1; then
    export PYTHONPATH="$scratch/site:$PYTHONPATH" ASE_GPU_CHECK_SITE="${#wheels[@]} carried wheels"
  else
    echo "gpu check: installing the carried wheels failed (the preflight says what is missing):" >&2
    tail -n 5 "$scratch/pip.log" >&2
  fi
fi
left=$(awk -v s="$started" -v now="$(date +%s.%N)" 'BEGIN { printf "%d", 300 - (now - s) }')
timeout -s KILL "$left" "$PY" tests/gpu/run.py --started "$started" --scratch "$scratch/check" "$@"
