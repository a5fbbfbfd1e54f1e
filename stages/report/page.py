"""The Gradio page of ``ase-mllm serve`` over :class:`stages.report.app.App`: upload or pick examples, a table of
every photo, one photo's map choice, overlay, critique (changed sentences marked), the no-IASC critique beside
it, the forced choices, a canvas to paint a map on; and ``/critique`` for programs.

Handlers return only what they change ({component: value}); every request that runs a model shares one
concurrency slot, so the models serve one request at a time and the rest queue.
"""
# No `from __future__ import annotations` here: Gradio finds a handler's gr.Request parameter by its evaluated
# annotation.
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from stages.report.app import MAPS, App, Session, Shown, UserError, display, explain
from storage.images import ImageError

EXPIRE_S = 600  # files the server keeps (outputs, programs' uploads) are deleted after this (checked every minute)
MODEL = {"concurrency_id": "model", "concurrency_limit": 1}  # one copy of the models: one request at a time


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


def background(shown: Shown | None) -> dict[str, Any] | None:
    """The image editor's value: the displayed photo to paint on, no strokes."""
    if shown is None:
        return None
    return {"background": np.asarray(display(shown.photo.image)), "layers": [], "composite": None}


def build(app: App) -> Any:
    """The page (a ``gr.Blocks``)."""
    import gradio as gr

    sibling_run = app.sibling.run if app.sibling else None
    with gr.Blocks(title=f"ASE-MLLM critique: {app.critic.run}", analytics_enabled=False,
                   delete_cache=(60, EXPIRE_S)) as blocks:
        session = gr.State(Session())
        gr.Markdown(f"## ASE-MLLM critique · run `{app.critic.run}` ({app.critic.checkpoint})"
                    + (f" beside `{sibling_run}` (w/o IASC)" if sibling_run else "")
                    + "\nDrop photos to get each one's EAT aesthetic score, its saliency map (LayerCAM) and the run's "
                      "critique; then change the map and watch the critique follow.")
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="Photos", file_count="multiple", elem_id="photos")
                if app.examples:
                    gr.Examples([[str(p)] for p in app.examples], inputs=[files],
                                label=f"Test images of {app.truth.dataset}", example_labels=[p.stem for p in app.examples])
            with gr.Column(scale=2):
                message = gr.Markdown(elem_id="message")
                table = gr.Dataframe(headers=["photo", "EAT score", "critique"] + (["w/o IASC"] if sibling_run else []),
                                     label="All photos", interactive=False, wrap=True, elem_id="table")
        with gr.Row():
            pick = gr.Dropdown(label="Photo", choices=[], interactive=True, elem_id="pick")
            choice = gr.Radio(list(MAPS), value=MAPS[0], label="Saliency map", elem_id="map")
            score = gr.Textbox(label="EAT aesthetic score", interactive=False, elem_id="score")
        with gr.Row():
            overlay = gr.Image(label="Map over the photo", type="pil", interactive=False, elem_id="overlay",
                               format="png")
            with gr.Column():
                critique = gr.HighlightedText(label=f"Critique ({app.critic.run})", color_map={"changed": "orange"},
                                              show_legend=True, elem_id="critique")
                sibling = gr.Textbox(label=f"Critique ({sibling_run}, w/o IASC: reads no map)", interactive=False,
                                     visible=sibling_run is not None, elem_id="sibling")
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

        def show(shown: Shown | None, map_choice: str = MAPS[0], editor: dict | None = None) -> dict:
            """The panel for one photo under one map; the message when that fails."""
            if shown is None:
                return {score: None, overlay: None, critique: None, sibling: None, status: "",
                        forced: gr.update(value=None, visible=False)}
            view = guarded(lambda: app.view(shown, map_choice, editor))
            if isinstance(view, str):
                return {message: view}
            return {message: "", score: view["score"], overlay: view["overlay"], critique: view["critique"],
                    sibling: shown.sibling, status: view["status"],
                    forced: gr.update(value=view["forced"], visible=view["forced"] is not None)}

        def map_options(shown: Shown | None) -> Any:
            """Back to the EAT map; the true mask offered only for a photo of the synthetic dataset."""
            known = shown is not None and app.truth.knows(shown.photo)
            return gr.update(choices=[m for m in MAPS if known or m != "true mask"], value=MAPS[0])

        def on_upload(paths: list[str] | None, request: gr.Request) -> None:
            app.remember(request.session_hash, paths)

        def on_files(paths: list[str] | None) -> dict:
            state = guarded(lambda: app.read(paths))
            if isinstance(state, str):  # an unexpected failure, already explained
                state, problems = Session(), [state]
            else:
                problems = state.errors + [f"**{s.name}**: {s.photo.note}." for s in state.photos if s.photo.note]
            first = state.photos[0] if state.photos else None
            rows = [[s.name, f"{s.eat.score:.2f}", s.eat.text] + ([s.sibling] if sibling_run else [])
                    for s in state.photos]
            names = [s.name for s in state.photos]
            first_shown = {**show(None), **show(first)}  # cleared, then the first photo (or why it cannot be shown)
            problems += [first_shown.pop(message)] if first_shown.get(message) else []
            return {**first_shown, session: state, message: "\n\n".join(problems), table: rows or None,
                    pick: gr.update(choices=names, value=names[0] if names else None), choice: map_options(first),
                    paint: background(first)}

        def on_map(state: Session, name: str | None, map_choice: str, editor: dict | None) -> dict:
            shown = state.named(name)
            return show(shown, map_choice, editor) if shown else {message: "Add a photo first."}

        def on_pick(state: Session, name: str | None) -> dict:
            shown = state.named(name)
            return {**show(shown), choice: map_options(shown), paint: background(shown)}

        def on_unload(request: gr.Request) -> None:
            app.forget(request.session_hash)

        private = {"api_visibility": "private"}
        files.upload(on_upload, [files], None, queue=False, **private)
        files.change(on_files, [files], [session, message, table, pick, choice, paint, *panel], **MODEL, **private)
        choice.input(on_map, [session, pick, choice, paint], [message, *panel], **MODEL, **private)
        use_paint.click(lambda: "painted", None, choice, queue=False, **private).then(
            on_map, [session, pick, choice, paint], [message, *panel], **MODEL, **private)
        pick.input(on_pick, [session, pick], [message, choice, paint, *panel], **MODEL, **private)
        blocks.unload(on_unload)
        api(app, gr)
    return blocks


def api(app: App, gr: Any) -> None:
    """``/critique`` for programs (``gradio_client``): a photo file and optionally a map image in; the EAT score,
    the map the critique was made with, the overlay and the critique out."""

    def critique(photo: str, saliency: str | None) -> tuple[float, dict[str, Any], Image.Image, str]:
        """Photo file and optional map image (white: salient; default: the photo's EAT map) -> (EAT score, the map
        used {"shape", "values", "source"}, overlay, critique)."""
        outcome = guarded(lambda: app.critique_file(Path(photo), Path(saliency) if saliency else None))
        if isinstance(outcome, str):
            raise gr.Error(outcome)
        return outcome

    inputs = [gr.File(visible=False), gr.File(visible=False)]
    outputs = [gr.Number(label="score", visible=False), gr.JSON(label="map", visible=False),
               gr.Image(label="overlay", visible=False, format="png"), gr.Textbox(label="critique", visible=False)]
    gr.Button(visible=False).click(critique, inputs, outputs, api_name="critique", **MODEL)
