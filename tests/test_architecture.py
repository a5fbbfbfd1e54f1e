"""The house rules that keep the code changeable: import contracts and a repository that stands alone."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / line for line in out.splitlines()]


def test_import_contracts_hold() -> None:
    """import-linter's contracts in pyproject.toml (layers: command line, stages, storage, configuration; no cycle
    among sibling modules or packages), counting imports made inside functions."""
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_contracts_catch_a_family_importing_the_other_and_a_cycle(tmp_path: Path) -> None:
    """The contracts can fail: in a copy of the tree, Qwen2.5-VL's data path importing InternVL's tiling breaks
    the families' independence, and the shared text module importing the shared data path (which imports it)
    breaks acyclicity."""
    import shutil

    for part in ("pipeline", "stages", "storage"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__", "data", "*.safetensors"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    qwen_data = tmp_path / "stages" / "families" / "qwen" / "data.py"
    qwen_data.write_text(qwen_data.read_text() + "\nfrom stages.families.internvl.tiling import plan_tiles  # noqa\n")
    text = tmp_path / "stages" / "families" / "text.py"
    text.write_text(text.read_text() + "\nfrom stages.families.data import pairs  # noqa\n")
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode != 0
    assert "Model families are independent" in proc.stdout and "BROKEN" in proc.stdout
    assert "No import cycles" in proc.stdout and proc.stdout.count("BROKEN") >= 2


def test_no_module_import_cycle() -> None:
    """Independently of import-linter: grimp's module graph (imports inside functions included) has no strongly
    connected component of more than one module (networkx finds them)."""
    import grimp
    import networkx as nx

    graph = grimp.build_graph("pipeline", "stages", "storage", cache_dir=None)
    edges = nx.DiGraph([(m, n) for m in graph.modules for n in graph.find_modules_directly_imported_by(m)])
    assert len(edges) > 50, "the module graph came out nearly empty"
    cycles = [sorted(c) for c in nx.strongly_connected_components(edges) if len(c) > 1]
    assert not cycles, f"modules importing each other in a circle: {cycles}"


def test_repository_stands_alone() -> None:
    """No file names the design card kept outside the repository, and every relative Markdown link resolves
    inside it."""
    outside_doc = "DESIGN" + ".md"
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    for path in tracked_files():
        if path.suffix not in {".py", ".md", ".yaml", ".toml", ".sh", ".txt", ".json", ".cfg"} or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        assert outside_doc not in text, f"{path.relative_to(REPO)} cites a document outside the repository"
        if path.suffix == ".md":
            for target in link.findall(text):
                if "://" in target or target.startswith("mailto:"):
                    continue
                resolved = (path.parent / target).resolve()
                assert resolved.is_relative_to(REPO) and resolved.exists(), f"{path.relative_to(REPO)}: {target}"
