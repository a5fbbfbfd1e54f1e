"""``tests/gpu/run.sh --tiny`` keeps working on CPU (the GPU check's code path, tiny shapes): its per-sample
FLOPs against torch's own FLOP counter, its preflight against the modules the phases really load, its numbers
surviving a kill of a later phase or a missing package, stage 2 on images without a map, and only the JSON and a
small log in $OUT. With ``ASE_LENT_PYTHON`` set (a Python holding the lent GPU machine's torch and transformers,
e.g. torch 2.11 / transformers 5.17), the same check runs there on wheels fetched by tests/gpu/fetch_wheels.py."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RUN_SH = REPO / "tests" / "gpu" / "run.sh"
sys.path.insert(0, str(REPO / "tests" / "gpu"))

import fetch_wheels  # noqa: E402
import run as gpu_check  # noqa: E402


def _env(out: Path, **extra: str) -> dict[str, str]:
    """The check's environment: no carried wheels (tests/gpu/wheels holds the GPU machine's Python's builds)."""
    return {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
            "ASE_GPU_WHEELS": str(out / "no-wheels"), **extra}


def _optional_modules() -> set[str]:
    """What optional packages bring when installed, which the check never needs: DeepSpeed (transformers and
    accelerate import it if present) and pandas (pyarrow's ``Table.from_pylist`` imports it if present; gradio
    installs it here): the top-level modules their import loads in a fresh interpreter."""
    code = ("import sys, importlib\n"
            "for name in ('deepspeed', 'pandas'):\n"
            "    try: importlib.import_module(name)\n"
            "    except ImportError: pass\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return set(done.stdout.split()) if done.returncode == 0 else set()


def _measured_flops(base_dir: Path, example: dict) -> int:
    """FLOPs torch counts in one forward + backward of the example (eager attention: its matmuls are counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    from stages.families.internvl.collate import Collator
    from stages.families.internvl.model import IASInternVLForConditionalGeneration
    from stages.families.internvl.tokenizer import load_tokenizer
    from stages.finetune.train import TrainConfig, set_trainable

    model = IASInternVLForConditionalGeneration.from_pretrained(str(base_dir), dtype=torch.float32,
                                                                attn_implementation="eager")
    set_trainable(model, TrainConfig(dataset="gpu").trainable)  # what the check trains
    model.train()
    batch = Collator(load_tokenizer(base_dir).pad_token_id)([example])
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    return counter.get_total_flops()


@pytest.mark.slow
def test_gpu_script_runs_tiny_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    out.mkdir()
    proc = subprocess.run(["bash", str(RUN_SH), "--tiny", "--scratch", str(scratch)], cwd=REPO, env=_env(out),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check_tiny.json", "gpu_check_tiny.log"]  # scratch elsewhere
    assert (out / "gpu_check_tiny.log").stat().st_size < 5 * gpu_check.LOG_TAIL + 2000
    result = json.loads((out / "gpu_check_tiny.json").read_text())
    pre = result["preflight"]
    assert pre["status"] == "done" and pre["missing"] == {} and pre["too_old"] == {}
    assert pre["versions"]["torch"] == torch.__version__.split("+")[0] and result["device"] == "cpu"
    optional = _optional_modules()
    for name in ("prepare", "stage1", "stage2", "generation"):  # the preflight imported all a phase needs
        unchecked = set(result[name]["modules"]) - set(pre["modules"]) - optional
        assert not unchecked, (name, unchecked)
    assert result["stage1"]["images"] == 8 and result["stage1"]["img_s"] > 0
    assert result["stage1"]["decode_img_s_1_thread"] > 0 and result["stage1"]["decode_img_s_worker_threads"] > 0
    assert result["stage2"]["tokens_s"] > 0 and result["stage2"]["steps_timed"] == 2
    assert result["stage2"]["missing_maps"] == 0 and result["stage2"]["images"] == 8 and result["stage2"]["plan_gb"] > 0
    assert result["generation"]["new_tokens"] > 0 and result["generation"]["tokens_s"] > 0
    assert "stage 2" in proc.stdout and "generate" in proc.stdout
    budgets = result["budgets_s"]  # every phase boxed, the boxes within the 5 minutes of run.sh
    assert set(budgets) == {"preflight", "prepare", "stage1", "stage2", "generation"}
    assert sum(budgets.values()) + gpu_check.MARGIN_S <= gpu_check.TOTAL_S == 300
    assert all(result[p]["status"] == "done" and result[p]["wall_s"] <= result[p]["budget_s"] + 1 for p in budgets)
    assert result["total_s"] <= 300

    # each timed sample's FLOPs: its own tiles and tokens, against what torch counts for that very example
    from stages.families.internvl.dataset import CritiqueDataset, TileSpec
    from stages.families.internvl.model import tile_size, tokens_per_tile
    from stages.families.internvl.tokenizer import load_tokenizer
    from stages.finetune.plan import load_model_config

    base_dir = scratch / "gpu_check_tiny" / "base-tiny"
    monkeypatch.setenv("ASE_WORK", str(scratch / "gpu_check_tiny" / "work"))
    config = load_model_config(base_dir)
    spec = TileSpec(tile_size=tile_size(config), max_tiles=result["stage2"]["max_tiles"],
                    tokens_per_tile=tokens_per_tile(config))
    data = CritiqueDataset("gpu", "train", load_tokenizer(base_dir), spec, None, allow_missing_saliency=True)
    samples = result["stage2"]["samples"]
    assert len({s["tiles"] for s in samples}) >= 2, samples  # images of different tile counts were timed
    ratios = []
    for s in samples:
        example = data[s["id"]]
        assert s["tiles"] == example["pixel_values"].shape[0] and s["tokens"] == len(example["input_ids"])
        ratios.append(s["flops"] / _measured_flops(base_dir, example))
    # the plan's count is ~18 % above torch's here (it charges frozen layers' backward a little more); charging
    # every sample the largest tiling would put the 1-tile samples ~4x off and the ratios far apart
    assert all(0.85 <= r <= 1.3 for r in ratios) and max(ratios) / min(ratios) <= 1.05, ratios


@pytest.mark.slow
def test_stage2_trains_on_images_without_a_map(tmp_path: Path) -> None:
    """Stage 1 cut short leaves images without a map: stage 2 trains on the uniform map for them and counts them
    (here stage 1 never ran: all 8)."""
    results = {}
    for name in ("prepare", "stage2"):
        done = subprocess.run([sys.executable, str(REPO / "tests" / "gpu" / "run.py"), "--phase", name, "--tiny",
                               "--scratch", str(tmp_path), "--deadline", str(time.time() + 120), "--result",
                               str(tmp_path / f"{name}.json")], cwd=REPO, env=_env(tmp_path), capture_output=True,
                              text=True, timeout=240)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert results["stage2"]["missing_maps"] == results["stage2"]["images"] == 8
    assert results["stage2"]["steps_timed"] == 2 and results["stage2"]["tokens_s"] > 0


@pytest.mark.slow
def test_a_missing_package_is_reported_and_the_json_still_comes_back(tmp_path: Path) -> None:
    """zarr shadowed by a package that cannot be imported: the preflight names it, the phases that need it fail
    with its error, the others run or are skipped, and gpu_check_tiny.json holds every phase's status."""
    shadow = tmp_path / "shadow" / "zarr"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'zarr'\", name='zarr')\n")
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(["bash", str(RUN_SH), "--tiny"], cwd=REPO, env=_env(out, PYTHONPATH=str(shadow.parent)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_check_tiny.json").read_text())
    assert result["preflight"]["status"] == "failed" and "zarr" in result["preflight"]["missing"]
    assert "cannot import zarr" in result["preflight"]["error"]
    assert result["prepare"]["status"] == "done"
    assert result["stage1"]["status"] == "failed (exit 1)" and "zarr" in result["stage1"]["error"]
    assert result["generation"]["status"] == "skipped: stage2 did not finish"
    assert "cannot import zarr" in proc.stdout


@pytest.mark.slow
def test_gpu_check_keeps_finished_phases_when_killed_later(tmp_path: Path) -> None:
    """SIGKILL the whole check (as a loan ending) while stage 2 runs: gpu_check_tiny.json already holds the
    finished phases' numbers, whole (written by rename after each phase)."""
    out = tmp_path / "gpu_check_tiny.json"
    proc = subprocess.Popen(["bash", str(RUN_SH), "--tiny"], cwd=REPO, env=_env(tmp_path), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    result: dict = {}
    while "stage1" not in result and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
        result = json.loads(out.read_text()) if out.exists() else {}
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert "stage1" in result, "the check ended (or never got past stage 1) before it could be killed"
    after = json.loads(out.read_text())
    assert "stage2" not in after and after["prepare"]["status"] == after["stage1"]["status"] == "done"
    assert after["stage1"]["images"] == 8 and after["stage1"]["img_s"] > 0


def test_a_phase_past_its_box_is_killed_with_its_children(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wall-clock box: preparing 2,000 full-size photos (a process pool; minutes of CPU) given 4 s is
    killed on time, its pool's processes with it."""
    import psutil

    monkeypatch.setenv("OUT", str(tmp_path))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    start = time.perf_counter()
    result = gpu_check.run_boxed("prepare", ["--images", "2000", "--scratch", str(tmp_path)], 4.0,
                                 tmp_path / "prepare.json", tmp_path / "prepare.log")
    assert result["status"] == "killed at its 4 s box" and result["budget_s"] == 4.0
    assert time.perf_counter() - start < 4.0 + 10  # killed on time (plus reaping)
    assert {p.pid for p in psutil.Process().children(recursive=True)} == before


def test_the_check_needs_what_pyproject_allows_and_carries_it() -> None:
    """The oldest transformers the check accepts is pyproject.toml's lower bound, and the carried wheel meets it;
    the wheel list pins one version of each package, for the GPU machine's Python 3.12 and for 3.11."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = {r.name: r for r in map(Requirement, tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])}
    lower = next(s.version for s in deps["transformers"].specifier if s.operator == ">=")
    assert lower == gpu_check.MIN_VERSIONS["transformers"]
    for python in ("3.12", "3.11"):
        pins = {r.name: next(iter(r.specifier)).version for r in fetch_wheels.pinned(python)}
        assert Version(pins["transformers"]) >= Version(lower) and {"dask", "distributed", "zarr"} <= pins.keys()
        assert ("importlib-metadata" in pins) == (python == "3.11")  # dask needs it below 3.12 only


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("ASE_LENT_PYTHON"), reason="set ASE_LENT_PYTHON to a Python holding the lent "
                    "GPU machine's packages (torch 2.11, transformers 5.17, no dask/zarr)")
def test_check_runs_on_the_lent_machines_packages_with_carried_wheels(tmp_path: Path) -> None:
    """On the lent machine's packages, as they are: the preflight names what is missing and too old; with the wheels
    fetch_wheels.py fetches for that Python, installed by run.sh, every phase of the tiny check runs."""
    python = os.environ["ASE_LENT_PYTHON"]
    version = subprocess.run([python, "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                             capture_output=True, text=True, check=True).stdout.strip()
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, str(REPO / "tests" / "gpu" / "fetch_wheels.py"), "--python", version,
                    "--dest", str(wheels)], check=True, timeout=600)
    results = {}
    for name, carried in (("bare", tmp_path / "none"), ("carried", wheels)):
        out = tmp_path / name
        out.mkdir()
        subprocess.run(["bash", str(RUN_SH), "--tiny"], cwd=REPO, env=_env(out, PYTHON=python,
                       ASE_GPU_WHEELS=str(carried)), capture_output=True, text=True, timeout=320)
        results[name] = json.loads((out / "gpu_check_tiny.json").read_text())
    bare, carried = results["bare"]["preflight"], results["carried"]["preflight"]
    assert {"dask", "zarr"} <= bare["missing"].keys() and re.search(r"needs >= 5\.24", bare["too_old"]["transformers"])
    assert carried["missing"] == {} and carried["too_old"] == {} and carried["versions"]["transformers"] == "5.24.0"
    assert all(results["carried"][p]["status"] == "done" for p in gpu_check.BUDGETS), results["carried"]
    for name in ("prepare", "stage1", "stage2", "generation"):  # nothing optional there: the preflight covers all
        assert set(results["carried"][name]["modules"]) <= set(carried["modules"]), name
