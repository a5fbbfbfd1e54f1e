"""``ase-mllm pretrain-demo``: retrain the demo's shipped starting weights (what real users download instead).

The demo starts, like a real user, from pretrained models: an EAT and a base InternVL that our own code
pretrained on the synthetic generator's unbounded stream (seed 1; the demo corpus is seed 0). They ship as
package data with a sidecar JSON (command, generator version, seed, recipe, validation metrics, wall time,
sha256); this command rebuilds them bit for bit on the same machine type.
"""
from __future__ import annotations

from pathlib import Path

import typer

from stages.pretrain.shipped import SHIPPED_BASE, SHIPPED_EAT

CORPUS_SEED = 1
VALIDATION_START, VALIDATION_IMAGES = 1_000_000, 256  # held-out renders far beyond the training images


def register(app: typer.Typer) -> None:
    @app.command("pretrain-demo")
    def pretrain_demo(
        what: str = typer.Option("all", "--what", help="eat, base or all."),
        images: int = typer.Option(12_000, "--images", min=64, help="Pretraining corpus size (seed 1)."),
        eat_epochs: int = typer.Option(8, "--eat-epochs", min=1),
        base_epochs: int = typer.Option(6, "--base-epochs", min=1, help="Base phase 1 (descriptions) epochs."),
        critique_steps: int = typer.Option(600, "--critique-steps", min=1,
                                           help="Base phase 2 steps (critiques mixed with descriptions)."),
        workers: int = typer.Option(2, "--workers", min=1, help="Processes rendering the corpus."),
        threads: int = typer.Option(0, "--threads", min=0, help="Torch threads for training (0: torch's default)."),
        eat_out: Path = typer.Option(SHIPPED_EAT, "--eat-out", help="Where the EAT weights go (default: shipped)."),
        base_out: Path = typer.Option(SHIPPED_BASE, "--base-out", help="Where the base goes (default: shipped)."),
    ) -> None:
        """Pretrain the demo's EAT and / or base MLLM on the procedural corpus and write them with sidecars."""
        import time

        from stages.synthetic.corpus import GENERATOR_VERSION
        from stages.synthetic.pretraining_corpus import build_corpus, validation_set
        from stages.pretrain.shipped import write_sidecar

        if what not in ("eat", "base", "all"):
            raise typer.BadParameter("--what must be eat, base or all")
        if threads:
            import torch

            torch.set_num_threads(threads)
        corpus = build_corpus(images, CORPUS_SEED, workers)
        val = validation_set(CORPUS_SEED, VALIDATION_START, VALIDATION_IMAGES)
        provenance = {"command": f"ase-mllm pretrain-demo --what {what} --images {images} --eat-epochs {eat_epochs} "
                                 f"--base-epochs {base_epochs} --critique-steps {critique_steps}"
                                 + (f" --threads {threads}" if threads else ""),  # results depend on it
                      "generator_version": GENERATOR_VERSION, "corpus_seed": CORPUS_SEED, "corpus_images": images,
                      "validation": f"images {VALIDATION_START}..{VALIDATION_START + VALIDATION_IMAGES - 1} of seed "
                                    f"{CORPUS_SEED}"}
        if what in ("eat", "all"):
            from stages.pretrain.eat import EatRecipe, pretrain_eat

            t0 = time.perf_counter()
            metrics = pretrain_eat(corpus.images, corpus.labels, corpus.records, val, EatRecipe(epochs=eat_epochs),
                                   eat_out)
            write_sidecar(eat_out, {**provenance, **metrics})
            v = metrics["validation"]
            typer.echo(f"pretrain-demo: EAT -> {eat_out} in {time.perf_counter() - t0:.0f} s; held-out SRCC "
                       f"{v['srcc']:.3f}, mask ratio {v['mask_ratio']:.2f}, subject preference "
                       f"{v['subject_preference']:.2f}")
        if what in ("base", "all"):
            from stages.pretrain.captioner import CaptionerRecipe, pretrain_captioner

            t0 = time.perf_counter()
            recipe = CaptionerRecipe(epochs=base_epochs, critique_steps=critique_steps)
            metrics = pretrain_captioner(corpus.images, corpus.labels, corpus.records, val, recipe, base_out,
                                         CORPUS_SEED)
            write_sidecar(base_out / "model.safetensors", {**provenance, **metrics}, base_out / "pretraining.json")
            v = metrics["validation"]
            typer.echo(f"pretrain-demo: base -> {base_out} in {time.perf_counter() - t0:.0f} s; held-out description "
                       f"accuracy {v['mean_accuracy']:.2f} (mean over the six attributes), critique macro precision "
                       f"{v['critique']['macro_precision']:.2f}, distinct {v['critique']['distinct']:.2f}")
