"""``ase-mllm study``: the saliency study by ground truth (stages/report/study.py), every run an ordinary fine-tune.

Steps, each the ordinary CLI command (reruns skip finished runs and resume interrupted ones; scores are cached):
the demo's EAT (ingest demo, train-eat), the study corpus (ingest, saliency), then every arm x seed fine-tuned with
the demo's recipe for ``STEPS`` steps, saving a checkpoint every ``CURVE_EVERY``. The validation learning curve of
every arm's seed-0 run (forced choice at each checkpoint) chooses the checkpoint every run is scored at: the step
with the best mean over the arms, so the choice favours no arm; the test split plays no part. Then the ladder's
rungs (stages/report/ladder.py) and the feature probe of the base the runs start from.
"""
from __future__ import annotations

import statistics
import time

import typer

STEPS = 300  # every study run's schedule (the demo's: warmup, cosine)
CURVE_EVERY = 100  # checkpoints, each a point of the validation learning curve


def register(app: typer.Typer) -> None:
    @app.command()
    def study(
        dataset: str = typer.Option("demo-study", "--dataset",
                                    help="A synthetic dataset of the manifest (ground truth needed)."),
        seeds: int = typer.Option(5, "--seeds", min=1, help="Seeds per arm."),
        arm: list[str] = typer.Option(None, "--arm", help="Only these arms (default: truth, eat, uniform, shuffled, "
                                                          "none)."),
        steps: int = typer.Option(STEPS, "--steps", min=1, help="Every run's schedule (optimizer steps)."),
        curve_every: int = typer.Option(CURVE_EVERY, "--curve-every", min=1,
                                        help="A checkpoint, and a point of the validation learning curve, every N "
                                             "steps."),
    ) -> None:
        """Fine-tune every arm (IASC on true masks, EAT maps, uniform maps, another image's mask; no IASC) x seeds;
        write summary.json, the table, the contrasts and the plot into reports/<dataset>/study/ and an HTML report of
        the eat arm's first run that shows them."""
        from pipeline import context
        from pipeline.demo import DATASET, EAT_ARGS, FINETUNE_ARGS, run_step
        from pipeline.paths import reports_dir, study_dir
        from stages.report.feature_probe import feature_probe
        from stages.report.ladder import ladder
        from stages.report.study import ARMS, run_name, score_run, write_study
        from stages.synthetic.corpus import GENERATOR_VERSION

        chosen_arms = [a for a in ARMS if not arm or a.name in arm]
        unknown = set(arm or ()) - {a.name for a in ARMS}
        if unknown:
            raise typer.BadParameter(f"unknown arm(s) {sorted(unknown)}; known: {[a.name for a in ARMS]}")
        t0 = time.perf_counter()
        manifest = context.manifest()
        run_step(app, "ingest", DATASET)
        run_step(app, "train-eat", "--dataset", DATASET, "--variant", manifest.eat.variant, *EAT_ARGS)
        run_step(app, "ingest", dataset)
        run_step(app, "saliency", "--dataset", dataset)
        if steps % curve_every:
            raise typer.BadParameter(f"--steps {steps} is not a multiple of --curve-every {curve_every}")
        args = study_args(FINETUNE_ARGS, steps, curve_every)
        seed_list = list(range(seeds))

        def train(a, seed: int) -> str:  # noqa: ANN001
            run = run_name(a, seed)
            run_step(app, "finetune", "--dataset", dataset, "--run", run, "--fusion", a.fusion, "--saliency",
                     a.saliency, "--seed", str(seed), *args)
            return run

        curve = learning_curve(dataset, {a.name: train(a, 0) for a in chosen_arms}, manifest, steps, curve_every)
        step = choose_step(curve)
        typer.echo("study: validation forced choice per checkpoint (mean over arms): "
                   + ", ".join(f"step {s}: {statistics.fmean(c[s] for c in curve.values()):.3f}" for s in steps_of(curve))
                   + f" -> step {step}")
        results: dict[str, list[dict]] = {}
        for a in chosen_arms:
            for seed in seed_list:
                run = train(a, seed)
                results.setdefault(a.name, []).append(score_run(dataset, run, manifest, checkpoint=f"checkpoint-{step}"))
                r = results[a.name][-1]
                typer.echo(f"study {run} (step {step}): forced choice {r['forced_choice']:.3f}, attribute P "
                           f"{r['macro_precision']:.3f}, distinct {r['distinct']:.2f}")
        chosen = {"step": step, "learning_curve": curve, "by": "the mean over the arms of the seed-0 runs' forced "
                  "choice on the validation split at each checkpoint", "schedule": f"{steps} steps"}
        like = run_name(chosen_arms[0], 0)
        probe = feature_probe(dataset, like, manifest)
        rungs = ladder(dataset, like, manifest)
        markdown = write_study(dataset, results, seed_list, GENERATOR_VERSION, chosen, probe, rungs)
        shown = run_name(next((a for a in chosen_arms if a.name == "eat"), chosen_arms[0]), 0)
        run_step(app, "report", "--dataset", dataset, "--run", shown, "--checkpoint", f"checkpoint-{step}")
        typer.echo("\n" + markdown.read_text())
        typer.echo(f"study: {len(chosen_arms)} arms x {seeds} seeds in {time.perf_counter() - t0:.0f} s -> "
                   f"{study_dir(dataset) / 'summary.json'}, {markdown}, {study_dir(dataset) / 'study.png'}, "
                   f"{reports_dir(dataset) / shown / 'index.html'}")


def study_args(finetune_args: list[str], steps: int = STEPS, curve_every: int = CURVE_EVERY) -> list[str]:
    """The demo's fine-tuning arguments with the study's schedule, its checkpoints, all of them kept."""
    args = list(finetune_args)
    for flag, value in (("--max-steps", str(steps)), ("--save-steps", str(curve_every))):
        args[args.index(flag) + 1] = value
    return [*args, "--keep-checkpoints", str(steps // curve_every)]


def learning_curve(dataset: str, runs: dict[str, str], manifest, steps: int = STEPS,  # noqa: ANN001
                   curve_every: int = CURVE_EVERY) -> dict[str, dict[int, float]]:
    """arm -> checkpoint step -> forced-choice accuracy of that arm's run on the validation split."""
    from stages.report.study import validation_accuracy

    return {arm: {step: validation_accuracy(dataset, run, manifest, f"checkpoint-{step}")
                  for step in range(curve_every, steps + 1, curve_every)} for arm, run in runs.items()}


def steps_of(curve: dict[str, dict[int, float]]) -> list[int]:
    return sorted(next(iter(curve.values())))


def choose_step(curve: dict[str, dict[int, float]]) -> int:
    """The checkpoint step with the best mean validation accuracy over the arms (ties: the earlier)."""
    return max(steps_of(curve), key=lambda s: (statistics.fmean(c[s] for c in curve.values()), -s))
