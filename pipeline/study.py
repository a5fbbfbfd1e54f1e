"""``ase-mllm study``: the saliency study by ground truth (stages/report/study.py), every run an ordinary fine-tune.

Steps, each the ordinary CLI command (reruns skip finished runs and resume interrupted ones; scores are cached):
the demo's EAT (ingest demo, train-eat), the study corpus (ingest, saliency), the cross-attention learning rate,
the step count and the learning rate chosen on the validation split by forced choice (``SEARCH``, the ``eat``
arm, seed 0), then every arm x seed fine-tuned with the demo's recipe and those, scored on the test split, and
the feature probe of the base they start from (stages/report/feature_probe.py: what a perfect map could select).
"""
from __future__ import annotations

import time

import typer

# What the study chooses on the validation split, one option after another (each holding the others at their
# best so far; the first value is the demo's): the cross-attention rate, the step count, the base's rate.
SEARCH = (("--cross-attention-lr", ("1e-2", "3e-3")), ("--max-steps", ("200", "100")), ("--lr", ("2e-4", "1e-4")))


def register(app: typer.Typer) -> None:
    @app.command()
    def study(
        dataset: str = typer.Option("demo-study", "--dataset",
                                    help="A synthetic dataset of the manifest (ground truth needed)."),
        seeds: int = typer.Option(5, "--seeds", min=1, help="Seeds per arm."),
        arm: list[str] = typer.Option(None, "--arm", help="Only these arms (default: truth, eat, uniform, shuffled, "
                                                          "none)."),
    ) -> None:
        """Fine-tune every arm (IASC on true masks, EAT maps, uniform maps, another image's mask; no IASC) x seeds;
        write summary.json, the table, the contrasts and the plot into reports/<dataset>/study/ and an HTML report of
        the eat arm's first run that shows them."""
        from pipeline import context
        from pipeline.demo import DATASET, EAT_ARGS, FINETUNE_ARGS, run_step
        from pipeline.paths import reports_dir, study_dir
        from stages.report.feature_probe import feature_probe
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
        args, tried = choose_recipe(app, dataset, manifest)
        seed_list = list(range(seeds))
        results: dict[str, list[dict]] = {}
        for a in chosen_arms:
            for seed in seed_list:
                run = run_name(a, seed)
                run_step(app, "finetune", "--dataset", dataset, "--run", run, "--fusion", a.fusion,
                         "--saliency", a.saliency, "--seed", str(seed), *args)
                results.setdefault(a.name, []).append(score_run(dataset, run, manifest))
                r = results[a.name][-1]
                typer.echo(f"study {run}: forced choice {r['forced_choice']:.3f}, attribute P "
                           f"{r['macro_precision']:.3f}, distinct {r['distinct']:.2f}")
        chosen = {**{flag.strip("-"): option(args, flag) for flag, _ in SEARCH}, "validation_forced_choice": tried,
                  "by": "the eat arm, seed 0", "what": "The cross-attention learning rate, the step count and the "
                                                       "learning rate were"}
        probe = feature_probe(dataset, run_name(chosen_arms[0], 0), manifest)
        markdown = write_study(dataset, results, seed_list, GENERATOR_VERSION, chosen, probe)
        shown = run_name(next((a for a in chosen_arms if a.name == "eat"), chosen_arms[0]), 0)
        run_step(app, "report", "--dataset", dataset, "--run", shown)  # an HTML report with the study in it
        typer.echo("\n" + markdown.read_text())
        typer.echo(f"study: {len(chosen_arms)} arms x {seeds} seeds in {time.perf_counter() - t0:.0f} s -> "
                   f"{study_dir(dataset) / 'summary.json'}, {markdown}, {study_dir(dataset) / 'study.png'}, "
                   f"{reports_dir(dataset) / shown / 'index.html'}")


def with_option(args: list[str], flag: str, value: str) -> list[str]:
    """``args`` with ``flag``'s value set to ``value``."""
    i = args.index(flag)
    return [*args[:i + 1], value, *args[i + 2:]]


def option(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def choose_recipe(app: typer.Typer, dataset: str, manifest) -> tuple[list[str], dict[str, float]]:  # noqa: ANN001
    """(the demo's fine-tuning arguments with the ``SEARCH`` options chosen by coordinate search: for each option in
    turn, the value whose ``eat``-arm run (seed 0) makes the most accurate forced choices on the validation split
    (ties: the earlier); every setting tried and its accuracy). The test split plays no part."""
    from pipeline.demo import FINETUNE_ARGS, run_step
    from stages.report.attributes import attribute_truth
    from stages.report.forced_choice import forced_choice_scores, run_choices

    truth = attribute_truth(dataset, "validation")
    if truth is None:
        raise typer.BadParameter(f"the study needs a synthetic dataset with ground truth; '{dataset}' has none")
    accuracy: dict[str, float] = {}

    def tried(args: list[str]) -> float:
        setting = " ".join(f"{flag} {option(args, flag)}" for flag, _ in SEARCH)
        if setting not in accuracy:
            run = "study-select" + "".join(f"-{flag.strip('-')}{option(args, flag)}" for flag, _ in SEARCH)
            run_step(app, "finetune", "--dataset", dataset, "--run", run, "--fusion", "cross_attention", "--saliency",
                     "eat", "--seed", "0", *args)
            choices, _ = run_choices(dataset, run, manifest, "validation")
            accuracy[setting] = forced_choice_scores(choices, truth.values)["accuracy"]
        return accuracy[setting]

    best = list(FINETUNE_ARGS)
    for flag, values in SEARCH:
        best = max((with_option(best, flag, v) for v in values), key=tried)  # max keeps the first of equals
    typer.echo("study: chosen on the validation split (forced choice): "
               + ", ".join(f"{setting}: {acc:.3f}" for setting, acc in accuracy.items()) + " -> "
               + " ".join(f"{flag} {option(best, flag)}" for flag, _ in SEARCH))
    return best, accuracy
