"""EAT training: targets, loss, the training loop, saliency evaluation and the train-eat command."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import typer
from PIL import Image
from scipy.stats import norm
from typer.testing import CliRunner

from stages.saliency.eat import build_eat, eat_score, load_eat_weights
from stages.saliency.train_eat import mask_ratio, emd_loss, evaluate_saliency, score_distribution, train_eat


def test_score_distribution_is_normalised_gaussian_over_bins() -> None:
    scores = torch.tensor([1.0, 5.3, 10.0])
    dist = score_distribution(scores)
    k = np.arange(1, 11)
    for row, s in zip(dist, scores.tolist()):
        pdf = norm.pdf(k, loc=s, scale=1.0)
        assert np.allclose(row.numpy(), pdf / pdf.sum(), atol=1e-6)
    assert torch.allclose(eat_score(dist)[1], torch.tensor(5.3), atol=0.05)  # mean of an interior score


def test_emd_of_one_hot_distributions() -> None:
    # two point masses i, j bins apart: the cdfs differ by 1 on |i-j| of the 10 bins
    eye = torch.eye(10)
    for i, j in [(0, 0), (2, 5), (0, 9)]:
        assert math.isclose(emd_loss(eye[[i]], eye[[j]]).item(), math.sqrt(abs(i - j) / 10), rel_tol=1e-6)


def test_mask_ratio_known_values() -> None:
    mask = torch.zeros(224, 224, dtype=torch.bool)
    mask[:56] = True  # a quarter of the image
    assert math.isclose(mask_ratio(torch.ones(14, 14), mask), 1.0, rel_tol=1e-6)  # uniform map
    cam = torch.zeros(14, 14)
    cam[:2] = 1.0  # energy well inside the masked quarter (bilinear spread stays inside)
    assert math.isclose(mask_ratio(cam, mask), 4.0, rel_tol=1e-6)


def _square_image(path: Path, size: int, seed: int) -> None:
    """Black 160x120 frame with one white square; its side is what the score encodes."""
    rng = np.random.default_rng(seed)
    img = np.zeros((120, 160, 3), dtype=np.uint8)
    y, x = rng.integers(0, 120 - size + 1), rng.integers(0, 160 - size + 1)
    img[y:y + size, x:x + size] = 255
    Image.fromarray(img).save(path)
    mask = np.zeros((120, 160), dtype=np.uint8)
    mask[y:y + size, x:x + size] = 255
    Image.fromarray(mask).save(path.parent.parent / "masks" / path.name.replace(".jpg", ".png"))


@pytest.fixture
def squares(tmp_path: Path) -> list[tuple[Path, float, Path]]:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    out = []
    for i in range(16):
        size = 20 + 5 * (i % 8)
        path = tmp_path / "images" / f"img{i:02d}.jpg"
        _square_image(path, size, seed=i)
        out.append((path, 1.0 + (size - 20) / 35 * 9, tmp_path / "masks" / f"img{i:02d}.png"))
    return out


def _bright_square(path: Path, mask_path: Path, rng: np.random.Generator) -> float:
    """Dark noisy 224x224 frame with one 64-px square at a random place; its brightness is the score."""
    brightness = rng.uniform(0.25, 1.0)
    img = rng.normal(0.15, 0.05, (224, 224, 3)).clip(0, 1)
    y, x = rng.integers(0, 224 - 64, 2)
    img[y:y + 64, x:x + 64] = brightness
    Image.fromarray((img * 255).astype(np.uint8)).save(path)
    mask = np.zeros((224, 224), dtype=np.uint8)
    mask[y:y + 64, x:x + 64] = 255
    Image.fromarray(mask).save(mask_path)
    return 1 + 9 * (brightness - 0.25) / 0.75


def test_train_eat_learns_a_known_task(tmp_path: Path) -> None:
    """Ground truth: the score is the square's brightness and the square is the mask. A held-out
    set must be ranked right (SRCC) and LayerCAM must point at the square (the raw-output EMD
    alone ranked this set at SRCC -0.74)."""
    rng = np.random.default_rng(0)
    data = []
    for i in range(48):
        path, mask = tmp_path / f"{i}.png", tmp_path / f"{i}_mask.png"
        data.append((path, _bright_square(path, mask, rng), mask))
    train, test = data[:32], data[32:]
    out = tmp_path / "eat.safetensors"
    metrics = train_eat([(p, s) for p, s, _ in train], "nano", out, epochs=8, seed=0, batch_size=8, lr=3e-3,
                        val_samples=[(p, s) for p, s, _ in test[:4]])
    assert len(metrics["history"]) == 8 and "val_srcc" in metrics
    model = build_eat("nano")
    load_eat_weights(model, out)  # strict: same architecture
    result = evaluate_saliency(model, test)
    assert result["n"] == 16 and result["n_masks"] == 16
    assert result["srcc"] > 0.3, result
    assert result["mask_ratio"] > 1.5, result  # the square covers 8 % of the frame: uniform = 1
    assert not list(tmp_path.glob(".eat.safetensors.*"))  # atomic write left no temp file


def test_train_eat_command(squares, tmp_path: Path, isolated_work: Path) -> None:
    from stages.saliency.train_cli import register

    dataset_dir = isolated_work / "datasets" / "toy"
    dataset_dir.mkdir(parents=True)
    rows = [{"image_id": p.stem, "split": "train" if i < 12 else "test", "path": f"images/{p.name}",
             "width": 160, "height": 120, "sha256": str(i), "score": s} for i, (p, s, _) in enumerate(squares)]
    from storage.tables import IMAGES_SCHEMA

    pq.write_table(pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA), dataset_dir / "images.parquet")
    (dataset_dir / "meta.json").write_text(json.dumps({"root": str(tmp_path)}))

    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    args = ["train-eat", "--dataset", "toy", "--variant", "nano", "--epochs", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "test mask ratio" in result.output and "SRCC" in result.output
    weights = isolated_work / "models" / "eat_nano.safetensors"
    metrics = json.loads(weights.with_suffix(".json").read_text())
    assert metrics["n_train"] == 12 and metrics["test"]["n"] == 4 and metrics["test"]["n_masks"] == 4
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "up to date" in again.output
