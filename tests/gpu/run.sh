#!/usr/bin/env bash
# tests/gpu/run.sh [--tiny]: stage 1 / stage 2 / generation speed on one GPU within 5 minutes: phases boxed by
# wall clock (prepare 70 s, stage 1 60 s, stage 2 105 s, generation 45 s; run.py BUDGETS), and a hard stop at
# 300 s (--tiny: tiny shapes and a few images on CPU, for CI). Numbers: $OUT/gpu_check.json (else work/),
# rewritten after each phase.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout -s KILL 300 "$PY" tests/gpu/run.py "$@"
