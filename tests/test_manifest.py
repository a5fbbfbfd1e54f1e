"""Manifest loading: variable expansion, defaults, and one clear error per kind of mistake."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app, run
from pipeline.manifest import ManifestError, load_manifest

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return path


def test_repository_manifest_loads_every_dataset() -> None:
    m = load_manifest(REPO / "data_manifest.yaml")
    assert {"demo", "pccd", "rpcd", "dpc2022", "ava_captions"} <= set(m.datasets)
    assert any(spec.format == "folder" for spec in m.datasets.values())
    for spec in m.datasets.values():
        if spec.format != "synthetic" and spec.format != "folder":
            assert spec.source and spec.licence, f"{spec.name} must say where to obtain it and its licence"


def test_variable_expansion_and_relative_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_ROOT", "/data/x")
    monkeypatch.delenv("UNSET_ROOT", raising=False)
    m = load_manifest(write(tmp_path, "datasets:\n  a: {format: pccd, root: '${MY_ROOT}'}\n"
                                      "  b: {format: folder, root: '${UNSET_ROOT:-rel/dir}'}\n"
                                      "  c: {format: folder, root: '${UNSET_ROOT:-${MY_ROOT}/sub}'}\n"
                                      "models:\n  eat: {checkpoint: '${UNSET_CKPT:-}'}\n"))
    assert m.dataset("a").root == Path("/data/x")
    assert m.dataset("b").root == tmp_path / "rel/dir"
    assert m.dataset("c").root == Path("/data/x/sub")
    assert m.eat.checkpoint is None and m.eat.variant == "small"  # the demo's EAT


def test_link_and_comment_settings_default_off_and_parse(tmp_path: Path) -> None:
    m = load_manifest(write(tmp_path, "datasets:\n  a: {format: folder, root: x}\n"
                                      "  b: {format: folder, root: x, allow_external_links: true, max_comment_chars: 500}\n"))
    assert (m.dataset("a").allow_external_links, m.dataset("a").max_comment_chars) == (False, None)
    assert (m.dataset("b").allow_external_links, m.dataset("b").max_comment_chars) == (True, 500)


@pytest.mark.parametrize(
    "text, key, fragment",
    [
        ("datasets: [1, 2\n", "line", "invalid YAML"),
        ("datasets:\n  a: {format: jpeg, root: x}\n", "datasets.a.format", "unknown format 'jpeg'"),
        ("datasets:\n  a: {root: x}\n", "datasets.a.format", "missing"),
        ("datasets:\n  a: {format: pccd}\n", "datasets.a.root", "missing"),
        ("datasets:\n  a: {format: pccd, root: [1]}\n", "datasets.a.root", "expected a string"),
        ("datasets:\n  a: {format: pccd, root: '${NOPE_NOT_SET}'}\n", "datasets.a.root", "NOPE_NOT_SET is not set"),
        ("datasets:\n  a: {format: pccd, root: x, expected: {test: many}}\n", "datasets.a.expected.test", "integer"),
        ("models:\n  mllm: {trust_remote_code: 'yes'}\n", "models.mllm.trust_remote_code", "true/false"),
        ("models:\n  mllm: {trust_remote_code: true}\n", "models.mllm.trust_remote_code", "ase-mllm convert-base"),
        ("datasets:\n  a: {format: folder, root: x, allow_external_links: 'yes'}\n", "datasets.a.allow_external_links",
         "expected true/false"),
        ("datasets:\n  a: {format: folder, root: x, allow_external_links: 1}\n", "datasets.a.allow_external_links",
         "expected true/false"),
        ("datasets:\n  a: {format: folder, root: x, max_comment_chars: 0}\n", "datasets.a.max_comment_chars",
         "below 1"),
        ("datasets:\n  a: {format: folder, root: x, max_comment_chars: 5k}\n", "datasets.a.max_comment_chars",
         "expected an integer"),
    ],
)
def test_broken_manifest_names_file_key_and_fix(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    message = str(err.value)
    assert str(path) in message and key in message and fragment in message and "Fix:" in message


def test_cli_prints_one_line_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "datasets:\n  a: {format: jpeg, root: x}\n")
    monkeypatch.setattr("sys.argv", ["ase-mllm", "--manifest", str(path), "status"])
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown format 'jpeg'" in err and "Traceback" not in err


def test_help_on_every_command() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "--manifest" in result.output
    commands = [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]
    commands += [g.name for g in app.registered_groups]
    assert "ingest" in commands and "status" in commands
    for name in commands:
        sub = runner.invoke(app, [name, "--help"])
        assert sub.exit_code == 0, (name, sub.output)
