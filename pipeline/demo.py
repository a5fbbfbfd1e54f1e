"""``ase-mllm demo``: every stage on the embedded synthetic corpus, with the numbers that matter.

ingest -> train-eat (tiny EAT) -> saliency -> finetune (IAS-ViT and the w/o-IASC ablation) -> report.
Each step is the ordinary CLI command, so a rerun only redoes what changed.
"""
from __future__ import annotations

import json
import time

import typer

from pipeline.paths import models_dir, reports_dir, runs_dir

DATASET = "demo"
RUNS = {"demo-ias": "cross_attention", "demo-noiasc": "none"}  # run name -> fusion
# A small model trained from scratch: a higher learning rate than the paper's 4e-5 (meant for pretrained 8B models).
# (--max-tiles is the InternVL family's; demo-qwen's pixel budget, 4 x 224 x 224, is its tiny config's.)
FINETUNE_ARGS = ["--max-tiles", "4", "--lr", "3e-3", "--batch-size", "8", "--per-device", "8",
                 "--max-steps", "300", "--save-steps", "50", "--logging-steps", "1", "--workers", "1"]


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        tiny_model: str = typer.Option("demo", "--tiny-model", help="The base family's demo model: demo (InternVL) "
                                                                    "or demo-qwen (Qwen2.5-VL, Table III layout)."),
    ) -> None:
        """Run all stages on the synthetic demo corpus (CPU, about 7 minutes) and print the results."""
        from pipeline import context

        manifest = context.manifest()
        variant = manifest.eat.variant  # the EAT the saliency stage will look for

        def step(*args: str) -> None:
            run_step(app, *args)

        t0 = time.perf_counter()
        step("ingest", DATASET)
        step("train-eat", "--dataset", DATASET, "--variant", variant)
        step("saliency", "--dataset", DATASET)
        losses = {}
        runs = demo_runs(tiny_model)
        for run, fusion in runs.items():
            step("finetune", "--dataset", DATASET, "--run", run, "--fusion", fusion, *FINETUNE_ARGS,
                 "--tiny-model", tiny_model)
            losses[run] = _loss_range(run)
        step("report", "--dataset", DATASET, "--run", next(iter(runs)))

        eat = json.loads((models_dir() / f"eat_{variant}.json").read_text())["test"]
        report = reports_dir(DATASET) / next(iter(runs))
        typer.secho("\n== demo summary", bold=True)
        typer.echo(f"saliency (EAT-{variant}, test split): mask ratio {eat['mask_ratio']:.2f} "
                   f"(map mean inside the true aesthetic regions / overall; uniform map = 1), "
                   f"SRCC {eat['srcc']:.3f}")
        for run, (start, end) in losses.items():
            typer.echo(f"finetune {run} (fusion {runs[run]}): training loss {start:.3f} -> {end:.3f}")
        typer.echo((report / "table.md").read_text())
        typer.echo(f"report: {report / 'index.html'}")
        typer.echo(f"demo finished in {time.perf_counter() - t0:.0f} s")


def demo_runs(tiny_model: str) -> dict[str, str]:
    """Run name -> fusion; the Qwen2.5-VL family's demo runs get their own names (demo-qwen-ias, ...)."""
    if tiny_model == "demo":
        return RUNS
    return {run.replace("demo-", f"{tiny_model}-", 1): fusion for run, fusion in RUNS.items()}


def run_step(app: typer.Typer, *args: str) -> None:
    """Run one ``ase-mllm`` command in this process (same manifest), echoing it; stop the caller if it fails."""
    from pipeline import context

    typer.secho(f"\n$ ase-mllm {' '.join(args)}", bold=True)
    code = typer.main.get_command(app).main(["--manifest", str(context.manifest().path), *args], standalone_mode=False)
    if code:  # a step that failed has printed why; the later ones would only fail too
        raise typer.Exit(code)


def _loss_range(run: str) -> tuple[float, float]:
    """First and last logged training loss of a run (from its metrics log, so reruns report too)."""
    logs = [json.loads(line) for line in (runs_dir(DATASET) / run / "metrics.jsonl").read_text().splitlines() if line]
    losses = {int(e["step"]): float(e["loss"]) for e in logs if "loss" in e and "step" in e}
    return losses[min(losses)], losses[max(losses)]
