"""``ase-mllm ingest``: --all, unknown names, a dataset whose root is missing."""
from __future__ import annotations

from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.manifest import ManifestError


def _manifest(tmp_path: Path) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (10, 10)).save(photos / "a.jpg")
    path = tmp_path / "m.yaml"
    path.write_text(f"datasets:\n  mine: {{format: folder, root: {photos}}}\n"
                    f"  gone: {{format: folder, root: {tmp_path / 'nowhere'}}}\n")
    return path


def test_all_reports_missing_root_and_continues(tmp_path: Path, isolated_work: Path) -> None:
    result = CliRunner().invoke(app, ["--manifest", str(_manifest(tmp_path)), "ingest", "--all"])
    assert result.exit_code == 1
    assert "root" in result.output and "nowhere" in result.output
    assert "ingest mine: 1 images" in result.output
    assert (isolated_work / "datasets" / "mine" / "meta.json").exists()
    assert not (isolated_work / "datasets" / "gone").exists()


def test_unknown_dataset_is_a_manifest_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--manifest", str(_manifest(tmp_path)), "ingest", "mine", "nope"])
    assert isinstance(result.exception, ManifestError) and "nope" in str(result.exception)


def test_no_dataset_named(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--manifest", str(_manifest(tmp_path)), "ingest"])
    assert result.exit_code != 0 and "--all" in result.output


def test_status_follows_ingest_and_notices_changed_inputs(tmp_path: Path) -> None:
    manifest = str(_manifest(tmp_path))
    runner = CliRunner()

    def states() -> dict[str, list[str]]:
        out = runner.invoke(app, ["--manifest", manifest, "status"]).output.splitlines()
        rows: dict[str, list[str]] = {}
        for line in out:
            if not line.startswith(" "):
                current = line.split()[0]
            else:
                rows.setdefault(current, []).append(" ".join(line.split()[:2]))
        return rows

    assert states()["mine"][0] == "ingest missing"
    runner.invoke(app, ["--manifest", manifest, "ingest", "mine"])
    assert states()["mine"] == ["ingest done", "saliency missing", "finetune missing", "report missing"]
    Image.new("RGB", (12, 10)).save(tmp_path / "photos" / "b.jpg")  # a new photo: the tables are stale
    assert states()["mine"][0] == "ingest stale"
    assert states()["gone"][0] == "ingest missing"


def test_folder_extensions_option_ignores_case_and_dot(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (10, 10)).save(photos / "a.jpg")
    Image.new("RGB", (10, 10)).save(photos / "b.PNG")
    path = tmp_path / "m.yaml"
    path.write_text(f"datasets:\n  mine: {{format: folder, root: {photos}, options: {{extensions: [PNG]}}}}\n")
    result = CliRunner().invoke(app, ["--manifest", str(path), "ingest", "mine"])
    assert "ingest mine: 1 images" in result.output, result.output
