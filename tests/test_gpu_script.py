"""``tests/gpu/run.sh --tiny`` keeps working on CPU (the GPU check's code path, tiny shapes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_runs_tiny_on_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "tests" / "gpu" / "run.sh"), "--tiny"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check_tiny.json").read_text())
    assert result["stage1"]["images"] == 8 and result["stage1"]["img_s"] > 0
    assert result["stage1"]["decode_img_s_1_thread"] > 0
    assert result["stage2"]["tokens_s"] > 0 and result["stage2"]["steps_timed"] == 2
    assert result["generation"]["new_tokens"] > 0 and result["generation"]["tokens_s"] > 0
    assert "stage 2" in proc.stdout and "generate" in proc.stdout
