"""``ase-mllm serve``: a local Gradio app where a photo gets its EAT score, saliency overlay and critique, and the
user moves the map and watches the critique follow (the page: ``page.py``; what it does: ``app.py``).

Local and offline: bound to 127.0.0.1 unless told otherwise, Gradio's analytics off, its own bundled fonts and
scripts only. One copy of each model serves every user. Uploads and outputs live in one temporary folder: a page
session's uploads are deleted when it ends, whatever else is there (outputs, programs' uploads, which identical
concurrent requests share) after ``page.EXPIRE_S``, and the folder when the server stops; nothing else is written.
"""
from __future__ import annotations

import difflib
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import PipelineError
from stages.report.app import App
from stages.report.critique import Critic
from stages.report.known_truth import KnownTruth
from stages.report.page import build  # imports Gradio when it builds the page, after serve() set its environment

EXAMPLES = 8  # test images of the run's dataset offered as examples
MAX_FILE_SIZE = "64mb"  # larger uploads are refused by the server before they reach us
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "DO_NOT_TRACK": "1"}


def sibling_run(dataset: str, run: str) -> str | None:
    """The dataset's finished ``--fusion none`` run of the same family whose name is most like ``run`` (demo-ias ->
    demo-noiasc), if any."""
    from pipeline.paths import runs_dir
    from stages import families
    from stages.report.generate import find_checkpoint, is_untrained, run_config

    family = families.of_run(run_config(runs_dir(dataset) / run))
    found = []
    for other in sorted(runs_dir(dataset).iterdir()) if runs_dir(dataset).is_dir() else []:
        cfg = run_config(other)
        if (other.name == run or is_untrained(other.name) or cfg.get("fusion") != "none"
                or families.of_run(cfg) is not family):
            continue
        try:
            find_checkpoint(other)
        except FileNotFoundError:
            continue
        found.append((-difflib.SequenceMatcher(a=run, b=other.name).ratio(), other.name))
    return min(found)[1] if found else None  # the most alike; of equals, the first by name


def example_images(dataset: str, into: Path) -> list[Path]:
    """Copies (same bytes) of the first EXAMPLES test images of ``dataset`` in ``into``; none when not ingested."""
    from storage.images import safe_join
    from storage.tables import image_root, read_table

    try:
        rows = read_table(dataset, "images").to_pylist()
        root = image_root(dataset)
    except FileNotFoundError:
        return []
    rows = sorted((r for r in rows if r["split"] == "test"), key=lambda r: r["image_id"])[:EXAMPLES]
    into.mkdir(parents=True, exist_ok=True)
    copies = []
    for r in rows:
        source = safe_join(root, r["path"])
        if source.is_file():
            copies.append(Path(shutil.copyfile(source, into / source.name)))
    return copies


def require_port(host: str, port: int) -> None:
    """A :class:`PipelineError` unless ``host:port`` can be listened on (checked before anything is loaded)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's own socket
        try:
            probe.bind((host, port))
        except OSError as e:
            raise PipelineError(f"cannot listen on {host}:{port} ({e.strerror or e}): pass another --port") from None


def serve(critic: Critic, sibling: Critic | None, host: str, port: int,
          announce: Callable[[str], None] = print) -> None:
    """Serve the app until interrupted; everything it writes lives in one temporary folder, removed at the end."""
    temp = Path(tempfile.mkdtemp(prefix="ase-mllm-serve-"))
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as Ctrl+C does: the folder is removed
    os.environ.update(OFFLINE_ENV | {"GRADIO_TEMP_DIR": str(temp / "gradio"), "MPLCONFIGDIR": str(temp / "mpl")})
    try:
        dataset = critic.run.split("/", 1)[0]
        app = App(critic, sibling, KnownTruth(dataset), example_images(dataset, temp / "examples"))
        blocks = build(app).queue(default_concurrency_limit=1)
        blocks.launch(server_name=host, server_port=port, max_file_size=MAX_FILE_SIZE, ssr_mode=False, quiet=True,
                      show_error=False, prevent_thread_lock=True, enable_monitoring=False)
        announce(f"serve: {critic.name}" + (f" beside {sibling.name}" if sibling else "")
                 + f" at http://{host}:{blocks.server_port}/ (Ctrl+C stops)")
        blocks.block_thread()
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt
