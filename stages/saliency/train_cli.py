"""``ase-mllm train-eat``: train a small EAT scorer on an ingested dataset's aesthetic scores."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("train-eat")
    def train_eat_command(
        dataset: str = typer.Option(..., "--dataset", help="Ingested dataset with a score column (e.g. the demo corpus)."),
        variant: str = typer.Option("small", "--variant", help="EAT variant: small (the demo's), tiny, nano or "
                                                               "dat_base."),
        epochs: int = typer.Option(40, "--epochs", min=0, help="Training epochs (0 with --init: evaluate the weights as they are)."),
        lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate."),
        init: Optional[Path] = typer.Option(None, "--init", exists=True, dir_okay=False,
                                            help="Fine-tune these weights (.safetensors / .pth) instead of training from scratch."),
        seed: int = typer.Option(0, "--seed"),
        force: bool = typer.Option(False, "--force", help="Retrain even when this model was already trained."),
    ) -> None:
        """Train EAT (10-bin EMD, as official) on the train split; evaluate LayerCAM + SRCC on the test split."""
        import hashlib
        import json

        from pipeline.paths import models_dir
        from stages.saliency.eat import build_eat, load_eat_weights
        from stages.saliency.train_eat import RECIPE_VERSION, evaluate_saliency, train_eat
        from storage.atomic import write_json_atomic
        from storage.images import safe_join, sha256_file
        from storage.tables import image_root, read_table

        rows = [r for r in read_table(dataset, "images").to_pylist() if r["score"] is not None]
        root = image_root(dataset)
        train = [(safe_join(root, r["path"]), float(r["score"])) for r in rows if r["split"] == "train"]
        test = [r for r in rows if r["split"] == "test"]
        if epochs == 0 and init is None:
            raise typer.BadParameter("--epochs 0 needs --init (weights to evaluate as they are)")
        if not train or not test:
            raise typer.BadParameter(f"{dataset} needs scored images in both train and test splits "
                                     f"(has {len(train)} train, {len(test)} test)")

        out = models_dir() / f"eat_{variant}.safetensors"  # where the saliency store and the demo look
        metrics_path = out.with_suffix(".json")
        fingerprint = hashlib.sha256(json.dumps(
            [dataset, sorted((r["image_id"], r["sha256"], r["score"], r["split"]) for r in rows), variant, epochs, seed,
             RECIPE_VERSION, lr, sha256_file(init) if init else None]
        ).encode()).hexdigest()
        if not force and out.exists() and metrics_path.exists():
            previous = json.loads(metrics_path.read_text())
            if previous.get("fingerprint") == fingerprint:
                typer.echo(f"train-eat: {out} is up to date (test mask ratio {previous['test']['mask_ratio']:.2f}, "
                           f"SRCC {previous['test']['srcc']:.3f}); --force retrains")
                return

        metrics = train_eat(train, variant, out, epochs=epochs, seed=seed, lr=lr, init=init)
        model = build_eat(variant)
        load_eat_weights(model, out)
        masks = [Path(root) / "masks" / f"{r['image_id']}.png" for r in test]
        triples = [(safe_join(root, r["path"]), float(r["score"]), m if m.exists() else None) for r, m in zip(test, masks)]
        metrics["test"] = evaluate_saliency(model, triples)
        metrics["fingerprint"] = fingerprint
        write_json_atomic(metrics_path, metrics)
        t = metrics["test"]
        start = f"from {init.name}, " if init else ""
        typer.echo(f"train-eat: EAT-{variant} on {dataset} ({start}{metrics['n_train']} train images, {epochs} epochs, "
                   f"{metrics['train_seconds']:.0f} s) -> {out}; test mask ratio {t['mask_ratio']:.2f} "
                   f"({t['n_masks']} masks), SRCC {t['srcc']:.3f}")
