"""``ase-mllm study``: the ablation study by ground truth (stages/report/study.py), every run an ordinary fine-tune.

Each variant x seed is ``ase-mllm finetune`` with the demo's recipe (``pipeline/demo.py``), so reruns skip
finished runs and resume interrupted ones; predictions and scores are cached the same way.
"""
from __future__ import annotations

import time

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def study(
        dataset: str = typer.Option("demo", "--dataset", help="Ingested dataset (the 'true masks' variant needs a synthetic one)."),
        seeds: int = typer.Option(3, "--seeds", min=1, help="Seeds per variant."),
        variant: list[str] = typer.Option(None, "--variant", help="Only these variants (default: all four)."),
    ) -> None:
        """Fine-tune every variant (IASC on EAT maps, no IASC, IASC on uniform maps, IASC on true masks) x seeds;
        write the mean ± sd table and plot into reports/<dataset>/study/."""
        from pipeline import context
        from pipeline.demo import FINETUNE_ARGS, run_step
        from pipeline.paths import reports_dir, study_dir
        from stages.report.study import VARIANTS, run_name, score_run, write_study

        chosen = [v for v in VARIANTS if not variant or v.name in variant]
        unknown = set(variant or ()) - {v.name for v in VARIANTS}
        if unknown:
            raise typer.BadParameter(f"unknown variant(s) {sorted(unknown)}; known: {[v.name for v in VARIANTS]}")
        t0 = time.perf_counter()
        manifest = context.manifest()
        seed_list = list(range(seeds))
        results: dict[str, list[dict]] = {}
        for v in chosen:
            for seed in seed_list:
                run = run_name(v, seed)
                run_step(app, "finetune", "--dataset", dataset, "--run", run, "--fusion", v.fusion,
                         "--saliency", v.saliency, "--seed", str(seed), *FINETUNE_ARGS)
                results.setdefault(v.name, []).append(score_run(dataset, run, manifest))
                r = results[v.name][-1]
                typer.echo(f"study {run}: B1 {r['Bleu_1']:.3f}, attribute P {r.get('macro_precision', float('nan')):.3f}, "
                           f"distinct {r['distinct']:.2f}")
        markdown = write_study(dataset, results, seed_list)
        for report in sorted(p.parent for p in reports_dir(dataset).glob("*/rows.json")):  # e.g. the demo's
            run_step(app, "report", "--dataset", dataset, "--run", report.name)  # its index.html gains the study
        typer.echo("\n" + markdown.read_text())
        typer.echo(f"study: {len(chosen)} variants x {seeds} seeds in {time.perf_counter() - t0:.0f} s -> "
                   f"{markdown}, {study_dir(dataset) / 'study.png'}")
