#!/usr/bin/env bash
# tests/gpu/run.sh [--tiny]: stage 1 / stage 2 / generation speed on one GPU in under 8 minutes
# (--tiny: tiny shapes and a few images on CPU, for CI). Numbers: $OUT/gpu_check.json (else work/).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 470 "$PY" tests/gpu/run.py "$@"
