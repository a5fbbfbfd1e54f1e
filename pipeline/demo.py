"""``ase-mllm demo``: every stage on the embedded synthetic corpus, with the numbers that matter.

Like a real user, the demo starts from pretrained models (stages/pretrain: an EAT and a tiny base InternVL
that ``ase-mllm pretrain-demo`` pretrained on 12,000 other images of the same generator, shipped as package
data): ingest -> train-eat (fine-tunes the shipped EAT on the demo's scores) -> saliency -> finetune (IAS-ViT
and the w/o-IASC ablation, from the shipped base) -> report. Each step is the ordinary CLI command, so a rerun
only redoes what changed.
"""
from __future__ import annotations

import json
import time

import typer

from pipeline.paths import models_dir, reports_dir, runs_dir
from stages.pretrain.shipped import SHIPPED_BASE, SHIPPED_EAT, require

DATASET = "demo"
RUNS = {"demo-ias": "cross_attention", "demo-noiasc": "none"}  # run name -> fusion
EAT_ARGS = ["--init", str(SHIPPED_EAT), "--epochs", "4", "--lr", "3e-4"]
# One 224 px tile per image (the base was pretrained so). The rates are v2's exploratory choice (one seed of the
# study's former corpus, 400 steps: true masks 0.496, uniform maps 0.426 on validation); the study runs this recipe
# for longer and chooses the checkpoint on its validation learning curve (pipeline/study.py).
FINETUNE_ARGS = ["--base", str(SHIPPED_BASE), "--max-tiles", "1", "--lr", "2e-4", "--cross-attention-lr", "1e-2",
                 "--batch-size", "8", "--per-device", "8", "--max-steps", "200", "--save-steps", "100",
                 "--logging-steps", "10", "--workers", "1"]
# The Qwen2.5-VL family has no shipped demo base: a tiny model from scratch (its pixel budget, 4 x 224 x 224, is
# its tiny config's), so it shows the plumbing and the Table III layout, not learning from the image.
QWEN_FINETUNE_ARGS = ["--tiny-model", "demo-qwen", "--lr", "3e-3", "--batch-size", "8", "--per-device", "8",
                      "--max-steps", "300", "--save-steps", "50", "--logging-steps", "5", "--workers", "1"]


def run_step(app: typer.Typer, *args: str) -> None:
    """Run one ``ase-mllm`` command in this process (same manifest), echoing it; stop the caller if it fails."""
    from pipeline import context

    typer.secho(f"\n$ ase-mllm {' '.join(args)}", bold=True)
    code = typer.main.get_command(app).main(["--manifest", str(context.manifest().path), *args], standalone_mode=False)
    if code:  # a step that failed has printed why; the later ones would only fail too
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        tiny_model: str = typer.Option("demo", "--tiny-model", help="demo: InternVL from the shipped pretrained base; "
                                                                    "demo-qwen: the Qwen2.5-VL family (Table III layout)."),
    ) -> None:
        """Run all stages on the synthetic demo corpus (CPU, about 4.5 minutes on 2 cores) and print the results."""
        from pipeline import context

        if tiny_model not in ("demo", "demo-qwen"):
            raise typer.BadParameter("--tiny-model must be demo or demo-qwen")
        require(SHIPPED_EAT, "demo EAT")  # both families' saliency starts from it
        if tiny_model == "demo":
            require(SHIPPED_BASE / "model.safetensors", "demo base")
        variant = context.manifest().eat.variant  # the EAT the saliency stage will look for
        t0 = time.perf_counter()
        run_step(app, "ingest", DATASET)
        run_step(app, "train-eat", "--dataset", DATASET, "--variant", variant, *EAT_ARGS)
        run_step(app, "saliency", "--dataset", DATASET)
        runs = demo_runs(tiny_model)
        for run, fusion in runs.items():
            args = FINETUNE_ARGS if tiny_model == "demo" else QWEN_FINETUNE_ARGS
            run_step(app, "finetune", "--dataset", DATASET, "--run", run, "--fusion", fusion, *args)
        run_step(app, "report", "--dataset", DATASET, "--run", next(iter(runs)))
        from stages.report.ladder import ladder

        rungs = ladder(DATASET, next(iter(runs)), context.manifest())
        typer.echo(summary(variant, runs, rungs, time.perf_counter() - t0))


def demo_runs(tiny_model: str) -> dict[str, str]:
    """Run name -> fusion; the Qwen2.5-VL family's demo runs get their own names (demo-qwen-ias, ...)."""
    if tiny_model == "demo":
        return RUNS
    return {run.replace("demo-", f"{tiny_model}-", 1): fusion for run, fusion in RUNS.items()}


def summary(variant: str, runs: dict[str, str], rungs: dict, seconds: float) -> str:
    """The demo's closing summary: saliency quality, the ladder's rungs (stages/report/ladder.py), then each run
    beside the best constant critique."""
    from stages.report.build import CONSTANT_ROW, UNTRAINED_ROW

    eat = json.loads((models_dir() / f"eat_{variant}.json").read_text())["test"]
    report = reports_dir(DATASET) / next(iter(runs))
    rows = json.loads((report / "rows.json").read_text())
    reading = ", ".join(f"{k} {v:.2f}" for k, v in rungs["base_reading"].items())
    lines = ["", "== demo summary",
             f"saliency (EAT-{variant}, test split): mask ratio {eat['mask_ratio']:.2f} (map mean inside the true "
             f"aesthetic regions / overall; uniform map = 1), SRCC {eat['srcc']:.3f}",
             f"R1 reading (the base describes each subject; share right): {reading}",
             f"R2 naming (the base's forced choice with the aesthetic subject named): {rungs['named_oracle']:.3f}",
             f"R4 finding (the EAT's subject preference: its map on the aesthetic subject / on the others; 1 = none): "
             f"{rungs['eat_subject_preference']:.2f}",
             f"{'R3 selecting, test split (48 images)':50} {'forced':>7} {'follows':>8} {'ignore':>7} {'global':>7} "
             f"{'attr P':>7} {'attr R':>7} {'distinct':>9} {'B1':>6} {'CIDEr':>6}  training loss"]
    for run, fusion in runs.items():
        start, end = _loss_range(run)
        lines.append(_row(f"finetune {run} (fusion {fusion})", rows[f"ASE-MLLM ({run})"]) + f"  {start:.3f} -> {end:.3f}")
    if UNTRAINED_ROW in rows:  # the shipped base as it is: what fine-tuning changed
        lines.append(_row("base before fine-tuning", rows[UNTRAINED_ROW]))
    lines.append(_row(CONSTANT_ROW, rows[CONSTANT_ROW]))
    lines += ["forced: forced-choice accuracy on the aesthetic subject's four attributes (chance 0.375): the value the "
              "model finds likeliest to say, given the image and its map; follows: with the true mask moved onto "
              "another subject, the share of those choices that name that subject's value where it differs; ignore: "
              "the same model's choices with its own map naming that value (what ignoring the map scores); global: "
              "forced choice on horizon and noise", f"report: {report / 'index.html'}",
              f"demo finished in {seconds:.0f} s"]
    return "\n".join(lines)


def _row(name: str, m: dict) -> str:
    follows = f"{m['mask_following']:8.3f}" if m.get("mask_following") is not None else f"{'-':>8}"
    ignore = f"{m['mask_following_baseline']:7.3f}" if m.get("mask_following_baseline") is not None else f"{'-':>7}"
    return (f"{name:50} {m['forced_choice']:7.3f} {follows} {ignore} {m['global_forced_choice']:7.3f} "
            f"{m['macro_precision']:7.3f} {m['macro_recall']:7.3f} {m['distinct']:9.2f} {m['Bleu_1']:6.3f} "
            f"{m['CIDEr']:6.3f}")


def _loss_range(run: str) -> tuple[float, float]:
    """First and last logged training loss of a run (from its metrics log, so reruns report too)."""
    logs = [json.loads(line) for line in (runs_dir(DATASET) / run / "metrics.jsonl").read_text().splitlines() if line]
    losses = {int(e["step"]): float(e["loss"]) for e in logs if "loss" in e and "step" in e}
    return losses[min(losses)], losses[max(losses)]
