"""``ase-mllm serve``: a local Gradio app where a photo gets its EAT score, saliency overlay and critique, and the
user moves the map and watches the critique follow.

Every critique goes through :class:`stages.report.critique.Critic` (the entry ``caption`` uses). The map is the
user's to choose: the EAT's (default), uniform, one painted on the photo, or, on a photo of a synthetic dataset,
its true mask (with the run's forced choice per attribute beside the truth). Sentences that differ from the EAT
map's critique are marked. A ``--fusion none`` sibling run's critique is shown beside the IASC run's.

Local and offline: bound to 127.0.0.1 unless told otherwise, Gradio's analytics off, its own bundled fonts and
scripts only. One copy of each model serves every user; requests that use them queue one at a time. Uploads
and outputs live in one temporary folder: a page session's uploads are deleted when it ends, whatever else is
there (outputs, programs' uploads, which identical concurrent requests share) after EXPIRE_S, and the folder
when the server stops; nothing else is written.
"""
# No `from __future__ import annotations` here: Gradio finds a handler's gr.Request parameter by its evaluated
# annotation.
import difflib
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from pipeline.errors import PipelineError
from stages.report.critique import Critic, Critique, Photo, read_photo
from stages.report.known_truth import KnownTruth
from storage.images import ImageError

MAPS = ("EAT map", "uniform", "painted", "true mask")  # the map choices, in the order the page lists them
MAP_NAMES = {"EAT map": "the EAT map", "uniform": "the uniform map", "painted": "the painted map",
             "true mask": "the true mask"}
DISPLAY_SIDE = 512  # px: photos are shown (and painted on) at most this large
MAP_GRID = 56  # painted and given maps are area-averaged to this grid, as the true masks are (TRUTH_MAP_SIZE)
EXAMPLES = 8  # test images of the run's dataset offered as examples
MAX_FILE_SIZE = "64mb"  # larger uploads are refused by the server before they reach us
EXPIRE_S = 600  # files the server keeps (outputs, programs' uploads) are deleted after this (checked every minute)
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "DO_NOT_TRACK": "1"}


@dataclass
class Shown:
    """One photo of a session: what was read and what the run said with the EAT map."""

    name: str
    photo: Photo
    eat: Critique
    sibling: str | None  # the no-IASC run's critique (it reads no map)


@dataclass
class Session:
    photos: list[Shown] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one line per file that could not be read


class UserError(Exception):
    """Something the user can fix, shown as it is."""


def sentences(text: str) -> list[str]:
    """A critique split after each ., ! or ? that ends a sentence."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def marked(text: str, before: str) -> list[tuple[str, str | None]]:
    """``text`` as (sentence, "changed" | None) pairs: "changed" where it is not in ``before``'s sentences (in order)."""
    now, then = sentences(text), sentences(before)
    out: list[tuple[str, str | None]] = []
    for op, i1, i2, _, _ in difflib.SequenceMatcher(a=now, b=then, autojunk=False).get_opcodes():
        out += [(s + " ", None if op == "equal" else "changed") for s in now[i1:i2]]
    return out


def unique(name: str, taken: set[str]) -> str:
    """``name``, or ``name (2)``, ``name (3)``, ... when taken."""
    k, candidate = 1, name
    while candidate in taken:
        k += 1
        candidate = f"{name} ({k})"
    return candidate


def painted_map(editor: dict | None) -> np.ndarray:
    """The painted strokes of an image editor's layers as a map (:func:`on_grid`); a :class:`UserError` when nothing
    is painted."""
    layers = [np.asarray(layer) for layer in (editor or {}).get("layers") or [] if layer is not None]
    alpha = [layer[..., 3] for layer in layers if layer.ndim == 3 and layer.shape[2] == 4]  # [H, W] each
    if not alpha or max(int(a.max()) for a in alpha) == 0:
        raise UserError("The painted map is empty: paint over the part of the photo that matters (in \"Paint a "
                        "map\"), then choose \"painted\" again.")
    return on_grid((np.max(np.stack(alpha), axis=0) > 0).astype(np.float32))


def read_map(path: str) -> np.ndarray:
    """A map given as an image file (grey levels; white: salient) on the map grid; refused when empty (all black)."""
    from storage.images import open_rgb

    grey = np.asarray(open_rgb(Path(path)).convert("L"), dtype=np.float32) / 255.0  # [H, W]
    if grey.max() == 0:
        raise UserError("The map is empty (all black): white marks what matters; a constant grey or white map is "
                        "the uniform map.")
    return on_grid(grey)


def on_grid(full: np.ndarray) -> np.ndarray:
    """A map [H, W] in [0, 1] over the whole photo, area-averaged to [MAP_GRID, MAP_GRID] (the true masks' grid)."""
    small = Image.fromarray(full.astype(np.float32), mode="F").resize((MAP_GRID, MAP_GRID), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32)


def display(image: Image.Image) -> Image.Image:
    """A copy of ``image`` at most DISPLAY_SIDE on its longer side."""
    shown = image.copy()
    shown.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
    return shown


def overlay_of(photo: Photo, saliency_map: np.ndarray | None) -> Image.Image:
    """The map over the displayed photo (uniform: an even tint)."""
    from stages.saliency.overlay import overlay

    return overlay(display(photo.image), np.ones((2, 2)) if saliency_map is None else saliency_map)


class App:
    """The models, the dataset's truth and the page's handlers (each returns what the page shows)."""

    def __init__(self, critic: Critic, sibling: Critic | None, truth: KnownTruth, examples: list[Path]) -> None:
        self.critic, self.sibling, self.truth, self.examples = critic, sibling, truth, examples
        self.session_files: dict[str, set[Path]] = {}

    # ---- reading
    def read(self, files: list[str] | None) -> Session:
        """Every file read and critiqued with its EAT map (by the run and its sibling); unreadable ones explained."""
        session = Session()
        photos: list[tuple[str, Photo]] = []
        names: set[str] = set()
        for path in files or []:
            name = unique(Path(path).name, names)
            names.add(name)
            try:
                photos.append((name, read_photo(Path(path))))
            except ImageError as e:
                session.errors.append(f"**{name}**: {explain(e)}")
        eats = self.critic.critique([p for _, p in photos])
        siblings = self.sibling.critique([p for _, p in photos]) if self.sibling else [None] * len(photos)
        session.photos = [Shown(name, photo, eat, s.text if s else None)
                          for (name, photo), eat, s in zip(photos, eats, siblings)]
        return session

    def remember(self, session_hash: str, files: list[str] | None) -> None:
        """Note a session's uploads, to delete them when it ends."""
        self.session_files.setdefault(session_hash, set()).update(Path(f) for f in files or [])

    def forget(self, session_hash: str) -> None:
        """Delete a finished session's uploads."""
        for path in self.session_files.pop(session_hash, set()):
            path.unlink(missing_ok=True)

    def critique_file(self, photo_path: str, map_path: str | None) -> tuple[float, dict[str, Any], Image.Image, str]:
        """What ``/critique`` answers: (EAT score, the map used {"shape", "values", "source"}, overlay, critique)."""
        photo = read_photo(Path(photo_path))
        given = read_map(map_path) if map_path else None
        result = self.critic.critique([photo], None if given is None else [given])[0]
        used = result.used_map
        values = {"shape": list(used.shape), "values": used.astype(float).tolist(),
                  "source": result.map_source if given is None else "given"}
        return result.score, values, overlay_of(photo, used), result.text

    # ---- what a photo shows
    def map_for(self, shown: Shown, choice: str, editor: dict | None) -> np.ndarray | None:
        if choice == "EAT map":
            return shown.eat.eat_map
        if choice == "uniform":
            return None
        if choice == "painted":
            return painted_map(editor)
        if choice == "true mask":
            if not self.truth.knows(shown.photo):
                raise UserError(f"{shown.name} is not an image of the dataset '{self.truth.dataset}': only its "
                                "images have a true mask.")
            return self.truth.true_mask(shown.photo)
        raise UserError(f"unknown map {choice!r}: choose one of {', '.join(MAPS)}")

    def view(self, shown: Shown, choice: str, editor: dict | None) -> dict[str, Any]:
        """Score, overlay, marked critique, forced choices and a status line for one photo under one map."""
        saliency_map = self.map_for(shown, choice, editor)
        result = shown.eat if choice == "EAT map" else self.critic.critique([shown.photo], [saliency_map])[0]
        critique = marked(result.text, shown.eat.text)
        changed = sum(label == "changed" for _, label in critique)
        status = (f"Critique with {MAP_NAMES[choice]}" + ("" if choice == "EAT map" else
                                                   f": {changed} of {len(critique)} sentence(s) differ from the "
                                                   "EAT map's critique") + ".")
        if not self.critic.follows_map:
            status += f" This run ({self.critic.run}) reads no map, so its critique cannot change."
        forced = None
        if self.truth.knows(shown.photo) and self.critic.follows_map:
            chosen = self.truth.forced_choice(self.critic, shown.photo, saliency_map)
            true = self.truth.attributes(shown.photo)
            forced = [[key, value, true[key], "yes" if value == true[key] else "no"] for key, value in chosen.items()]
        return {"score": f"{shown.eat.score:.2f}", "overlay": overlay_of(shown.photo, saliency_map),
                "critique": critique, "status": status, "forced": forced}


def explain(error: ImageError) -> str:
    """An image error as a sentence for the page."""
    what = {"not_an_image": "not an image", "truncated_image": "the file is truncated",
            "corrupt_image": "the file is damaged", "too_many_pixels": "too many pixels (a decompression bomb?)",
            "too_small": "too small to critique", "empty_file": "the file is empty"}.get(error.reason, error.reason)
    return f"{what} ({error.detail.split(': ', 1)[-1]})"


def build(app: App) -> Any:
    """The page: upload / examples, a table of every photo, and one photo's map, overlay and critique(s)."""
    import gradio as gr

    with gr.Blocks(title=f"ASE-MLLM critique: {app.critic.run}", analytics_enabled=False,
                   delete_cache=(60, EXPIRE_S)) as blocks:
        session = gr.State(Session())
        gr.Markdown(f"## ASE-MLLM critique · run `{app.critic.run}` ({app.critic.checkpoint})"
                    + (f" beside `{app.sibling.run}` (w/o IASC)" if app.sibling else "")
                    + "\nDrop photos to get each one's EAT aesthetic score, its saliency map (LayerCAM) and the run's "
                      "critique; then change the map and watch the critique follow.")
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="Photos", file_count="multiple", elem_id="photos")
                if app.examples:
                    gr.Examples([[str(p)] for p in app.examples], inputs=[files], label=f"Test images of "
                                f"{app.truth.dataset}", example_labels=[p.stem for p in app.examples])
            with gr.Column(scale=2):
                message = gr.Markdown(elem_id="message")
                table = gr.Dataframe(headers=["photo", "EAT score", "critique"] + (["w/o IASC"] if app.sibling else []),
                                     label="All photos", interactive=False, wrap=True, elem_id="table")
        with gr.Row():
            pick = gr.Dropdown(label="Photo", choices=[], interactive=True, elem_id="pick")
            choice = gr.Radio(list(MAPS), value="EAT map", label="Saliency map", elem_id="map")
            score = gr.Textbox(label="EAT aesthetic score", interactive=False, elem_id="score")
        with gr.Row():
            overlay = gr.Image(label="Map over the photo", type="pil", interactive=False, elem_id="overlay",
                               format="png")
            with gr.Column():
                critique = gr.HighlightedText(label=f"Critique ({app.critic.run})", color_map={"changed": "orange"},
                                              show_legend=True, elem_id="critique")
                sibling = gr.Textbox(label=f"Critique ({app.sibling.run}, w/o IASC: reads no map)" if app.sibling
                                     else "", visible=app.sibling is not None, interactive=False, elem_id="sibling")
                status = gr.Markdown(elem_id="status")
                forced = gr.Dataframe(headers=["attribute", "forced choice", "truth", "right"], interactive=False,
                                      label="Forced choice per attribute (synthetic images)", visible=False,
                                      elem_id="forced")
        with gr.Accordion("Paint a map", open=False, elem_id="paint-panel"):
            paint = gr.ImageEditor(label="Paint over what matters, then choose \"painted\"", type="numpy",
                                   image_mode="RGBA", sources=[], transforms=[], layers=False, elem_id="paint",
                                   brush=gr.Brush(default_size=24, colors=["#ff0000"], color_mode="fixed"))
            use_paint = gr.Button("Critique with the painted map", elem_id="use-paint")

        panel = [score, overlay, critique, sibling, status, forced]

        def panel_values(app_view: dict[str, Any] | None, shown: Shown | None) -> list[Any]:
            if app_view is None:
                return [None, None, None, None, "", gr.update(value=None, visible=False)]
            rows = app_view["forced"]
            return [app_view["score"], app_view["overlay"], app_view["critique"], shown.sibling if shown else None,
                    app_view["status"], gr.update(value=rows, visible=rows is not None)]

        def shown_named(state: Session, name: str | None) -> Shown | None:
            return next((s for s in state.photos if s.name == name), state.photos[0] if state.photos else None)

        def on_upload(paths: list[str] | None, request: gr.Request) -> None:
            app.remember(request.session_hash, paths)

        def on_files(paths: list[str] | None):  # noqa: ANN202
            state = guarded(lambda: app.read(paths))
            if isinstance(state, str):  # an unexpected failure, already explained
                return [Session(), state, None, gr.update(choices=[], value=None), "EAT map", None, *panel_values(None, None)]
            first = state.photos[0] if state.photos else None
            view = guarded(lambda: app.view(first, "EAT map", None)) if first else None
            rows = [[s.name, f"{s.eat.score:.2f}", s.eat.text] + ([s.sibling] if app.sibling else []) for s in state.photos]
            notes = [f"**{s.name}**: {s.photo.note}." for s in state.photos if s.photo.note]
            text = "\n\n".join(state.errors + notes + ([view] if isinstance(view, str) else []))
            names = [s.name for s in state.photos]
            return [state, text, rows or None, gr.update(choices=names, value=names[0] if names else None), "EAT map",
                    background(first), *panel_values(view if isinstance(view, dict) else None, first)]

        def on_map(state: Session, name: str | None, map_choice: str, editor: dict | None):  # noqa: ANN202
            shown = shown_named(state, name)
            if shown is None:
                return ["Add a photo first.", *[gr.update()] * len(panel)]
            view = guarded(lambda: app.view(shown, map_choice, editor))
            if isinstance(view, str):
                return [view, *[gr.update()] * len(panel)]
            return ["", *panel_values(view, shown)]

        def on_pick(state: Session, name: str | None):  # noqa: ANN202
            shown = shown_named(state, name)
            view = guarded(lambda: app.view(shown, "EAT map", None)) if shown else None
            return ["EAT map", background(shown), *panel_values(view if isinstance(view, dict) else None, shown)]

        model = {"concurrency_id": "model", "concurrency_limit": 1}  # one copy of the models: one request at a time
        files.upload(on_upload, [files], None, queue=False, api_visibility="private")
        files.change(on_files, [files], [session, message, table, pick, choice, paint, *panel], **model,
                     api_visibility="private")
        choice.input(on_map, [session, pick, choice, paint], [message, *panel], **model, api_visibility="private")
        use_paint.click(lambda: "painted", None, choice, queue=False, api_visibility="private").then(
            on_map, [session, pick, choice, paint], [message, *panel], **model, api_visibility="private")
        pick.input(on_pick, [session, pick], [choice, paint, *panel], **model, api_visibility="private")
        def on_unload(request: gr.Request) -> None:
            app.forget(request.session_hash)

        blocks.unload(on_unload)
        api(app, gr, model)
    return blocks


def background(shown: Shown | None) -> Any:
    """The image editor's value: the displayed photo to paint on, no strokes."""
    return None if shown is None else {"background": np.asarray(display(shown.photo.image)), "layers": [], "composite": None}


def guarded(work: Callable[[], Any]) -> Any:
    """``work()``, or the message to show when it fails; the server keeps serving either way."""
    try:
        return work()
    except UserError as e:
        return str(e)
    except ImageError as e:
        return explain(e)
    except Exception as e:  # noqa: BLE001: one failed request must not end the others
        traceback.print_exc(file=sys.stderr)
        return f"Something went wrong ({type(e).__name__}: {e}); the details are in the server's log."


def api(app: App, gr: Any, model: dict[str, Any]) -> None:
    """``/critique`` for programs (``gradio_client``): a photo file and optionally a map file in; the EAT score, the
    map the critique was made with (raw values), the overlay and the critique out."""

    def critique(photo: str, saliency: str | None) -> tuple[float, dict[str, Any], Image.Image, str]:
        """Photo file and optional map image (white: salient; default: the photo's EAT map) -> (EAT score, the map
        used {"shape", "values", "source"}, overlay, critique)."""
        outcome = guarded(lambda: app.critique_file(photo, saliency))
        if isinstance(outcome, str):
            raise gr.Error(outcome)
        return outcome

    photo_in, map_in = gr.File(visible=False), gr.File(visible=False)
    outputs = [gr.Number(label="score", visible=False), gr.JSON(label="map", visible=False),
               gr.Image(label="overlay", visible=False, format="png"), gr.Textbox(label="critique", visible=False)]
    gr.Button(visible=False).click(critique, [photo_in, map_in], outputs, api_name="critique", **model)


# ---------------------------------------------------------------- the server


def sibling_run(dataset: str, run: str) -> str | None:
    """The dataset's ``--fusion none`` run of the same family whose name is most like ``run`` (demo-ias ->
    demo-noiasc), if any."""
    from pipeline.paths import runs_dir
    from stages.report.generate import find_checkpoint, is_untrained, run_config

    mine = run_config(runs_dir(dataset) / run)
    found = []
    for other in sorted(runs_dir(dataset).iterdir()) if runs_dir(dataset).is_dir() else []:
        cfg = run_config(other)
        if (other.name == run or is_untrained(other.name) or cfg.get("fusion") != "none"
                or cfg.get("family", "internvl") != mine.get("family", "internvl")):
            continue
        try:
            find_checkpoint(other)
        except FileNotFoundError:
            continue
        found.append((difflib.SequenceMatcher(a=run, b=other.name).ratio(), other.name))
    return max(found)[1] if found else None


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
        import gradio  # noqa: F401: imported after the environment above is set

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
