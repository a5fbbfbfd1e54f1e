"""CLI: ``ase-mllm saliency [--dataset NAME ...]`` and ``ase-mllm saliency show IMAGE``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline import context
from pipeline.errors import fail


def _find_image(image: str, datasets: list[str] | None) -> tuple[Path, str]:
    """(path, display name) of IMAGE: a file, or an image_id / sha256 in an ingested dataset."""
    if Path(image).is_file():
        return Path(image), Path(image).stem
    from storage.images import safe_join
    from storage.tables import image_root, ingested, read_table

    names = datasets or ingested(context.manifest().datasets)
    for name in names:
        table = read_table(name, "images")
        for image_id, sha, rel in zip(*(table[c].to_pylist() for c in ("image_id", "sha256", "path"))):
            if image in (image_id, sha):
                return safe_join(image_root(name), rel), image_id.replace("/", "_")
    raise FileNotFoundError(f"{image} is neither a file nor an image_id / sha256 in {', '.join(names) or 'any ingested dataset'}")


def register(app: typer.Typer) -> None:
    from stages.saliency import train_cli

    saliency_app = typer.Typer(help="Aesthetic saliency maps (EAT + LayerCAM) into the saliency store.")

    @saliency_app.callback(invoke_without_command=True)
    def saliency(
        ctx: typer.Context,
        dataset: Optional[list[str]] = typer.Option(None, "--dataset", "-d", help="Only these datasets (default: all ingested)."),
        workers: Optional[int] = typer.Option(None, "--workers", help="Local dask workers; 0 runs in this process. Default: 0 below 2,048 images to compute, else one per GPU (per core on CPU)."),
        scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Use an existing dask cluster, e.g. tcp://HOST:8786."),
        batch_size: int = typer.Option(8, "--batch-size", help="Images per LayerCAM batch."),
        shard_rows: Optional[int] = typer.Option(None, "--shard-rows", help="Maps per store shard, the unit of work (default: ~4 per worker, 16..1024); used when the store is created."),
        decode_threads: Optional[int] = typer.Option(None, "--decode-threads", min=1, help="Threads per worker reading and decoding images ahead of the model (default: the cores per worker)."),
    ) -> None:
        """Compute maps for every ingested image not yet in the store (incremental, resumable)."""
        if ctx.invoked_subcommand is not None:
            return
        from stages.saliency.job import run_saliency

        try:
            s = run_saliency(context.manifest(), dataset or None, workers, scheduler, batch_size, shard_rows,
                             decode_threads)
        except (FileNotFoundError, RuntimeError) as e:
            fail(str(e))
            return
        rate = s.computed / s.wall_s if s.wall_s > 0 else 0.0
        computing = f"; {s.compute_s:.1f} s computing" if s.computed else ""
        typer.echo(
            f"saliency: {s.computed} computed, {s.reused} reused, {s.quarantined} quarantined "
            f"in {s.wall_s:.1f} s ({rate:.1f} img/s{computing}) -> {s.store}"
        )

    @saliency_app.command("show")
    def show(
        image: str = typer.Argument(..., help="Image file, or an image_id / sha256 of an ingested dataset."),
        out: Optional[Path] = typer.Option(None, "--out", help="PNG to write (default work/saliency/show/<name>.png)."),
        dataset: Optional[list[str]] = typer.Option(None, "--dataset", "-d", help="Look IMAGE up in these datasets."),
    ) -> None:
        """Write a heatmap overlay of one image's saliency map and print its path."""
        from pipeline.paths import saliency_root
        from stages.saliency.job import saliency_of
        from stages.saliency.overlay import overlay
        from storage.atomic import atomic_path
        from storage.image_files import printable
        from storage.images import ImageError, open_rgb

        try:
            path, name = _find_image(image, dataset or None)
            img = open_rgb(path)
            saliency_map, category, score, source = saliency_of(context.manifest(), path, img)
        except (FileNotFoundError, ImageError) as e:
            fail(str(e))
            return
        target = out or saliency_root() / "show" / f"{name}.png"
        with atomic_path(target) as tmp:
            overlay(img, saliency_map).save(tmp, format="PNG")
        typer.echo(f"{printable(str(target))}  (category {category}, score {score:.3f}, map {source})")

    app.add_typer(saliency_app, name="saliency")
    train_cli.register(app)
