"""Every command a user is shown parses as typed: the README's code blocks and inline commands, the
config files' headers and the manifest's comments. ``torchrun`` lines go through torchrun's own argument
parser (torch.distributed.run), which must hand every pipeline argument through untouched; the pipeline
part must parse with the CLI (typer's parser, no command runs); ``make`` targets are expanded with
``make -n`` and their ``ase-mllm`` lines parsed the same way; ``tensorboard`` lines by TensorBoard's own flag
parser."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from pipeline.cli import app

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("ase-mllm", "torchrun", "make", "python", "tensorboard")
PLACEHOLDERS = {"...", "…"}  # "the rest of the command": dropped
SOURCES = [REPO / "README.md", REPO / "data_manifest.yaml", *sorted((REPO / "stages").glob("*/configs/*.yaml"))]


def _logical_lines(block: str) -> list[str]:
    """Lines of a code block with ``\\`` continuations joined and a ``$ `` prompt removed."""
    lines, current = [], ""
    for raw in block.splitlines():
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        lines.append(current.strip().removeprefix("$ "))
        current = ""
    return lines + ([current.strip()] if current.strip() else [])


def _tokens(line: str) -> list[str] | None:
    """The command's words (comments, placeholders and ``VAR=value`` prefixes removed), or None: not a command."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    if not words or words[0] not in COMMANDS or (words[0] == "python" and words[1:3] != ["-m", "pipeline"]):
        return None
    return [w for w in words if w not in PLACEHOLDERS]


def shown_commands() -> list[tuple[str, list[str], bool]]:
    """(where, words, complete) of every command in the README's code blocks (complete commands) and inline
    code, the config files' header comments (complete) and the manifest's backticked comments. Inline code may
    name a command without its required arguments ("run `ase-mllm plan`")."""
    found = []
    for path in SOURCES:
        text = path.read_text()
        if path.suffix == ".md":
            blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)
            spans = re.findall(r"(?<!`)`([^`\n]+(?:\n[^`\n]+)?)`(?!`)", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))
            candidates = [(line, True) for b in blocks for line in _logical_lines(b)]
            candidates += [(" ".join(s.split()), False) for s in spans if "|" not in s and "[" not in s]
        else:
            comments = [line.lstrip("# ").strip() for line in text.splitlines() if line.lstrip().startswith("#")]
            candidates = [(c, True) for c in comments] + [(s, False) for c in comments
                                                          for s in re.findall(r"`([^`]+)`", c)]
        for line, complete in candidates:
            words = _tokens(line)
            if words:
                found.append((f"{path.relative_to(REPO)}: {line}", words, complete))
    return found


def parse_cli(argv: list[str], complete: bool = True) -> None:
    """Parse ``argv`` with the pipeline's CLI down to the last subcommand, as ``ase-mllm`` would, without
    invoking anything: unknown commands or options raise; for a complete command, so do missing required
    options, missing values and bad types."""
    cmd = typer.main.get_command(app)
    ctx = cmd.make_context("ase-mllm", list(argv), resilient_parsing=not complete)
    while hasattr(cmd, "commands"):
        rest = [*ctx._protected_args, *ctx.args]  # a group keeps its subcommand and its arguments here
        if not rest:
            return
        name, cmd, rest = cmd.resolve_command(ctx, rest)
        ctx = cmd.make_context(name, rest, parent=ctx, resilient_parsing=not complete)


def torchrun_argv(words: list[str]) -> list[str]:
    """The pipeline arguments torchrun passes on from ``torchrun ... -m pipeline ARGS`` (its own parser)."""
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(words[1:])  # exits (SystemExit) on e.g. an ambiguous option
    assert args.module and args.training_script == "pipeline", "torchrun must run the pipeline with -m pipeline"
    start = words.index("-m") + 2
    assert args.training_script_args == words[start:], "torchrun took some of the pipeline's arguments"
    return args.training_script_args


def _make_lines(words: list[str]) -> list[list[str]]:
    """``ase-mllm`` argument lists the Makefile runs for ``make TARGET VAR=value ...`` (``make -n``)."""
    targets = set(re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), flags=re.M))
    named = [w for w in words[1:] if "=" not in w]
    assert named and set(named) <= targets, f"make targets {named} not all in the Makefile ({sorted(targets)})"
    proc = subprocess.run(["make", "-n", *words[1:]], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line)[1:] for line in proc.stdout.splitlines() if shlex.split(line)[0].endswith("/ase-mllm")]


def check(words: list[str], complete: bool) -> None:
    if words[0] == "torchrun":
        parse_cli(torchrun_argv(words), complete)
    elif words[0] == "make":
        for argv in _make_lines(words):
            parse_cli(argv)
    elif words[0] == "tensorboard":  # installed with the package, its flags as typed (exits on a bad one)
        from tensorboard import program

        assert Path(sys.executable).with_name("tensorboard").exists(), "the tensorboard command is not installed"
        program.TensorBoard().configure(argv=words)
    else:  # ase-mllm ARGS or python -m pipeline ARGS
        parse_cli(words[3:] if words[0] == "python" else words[1:], complete)


COMMAND_LINES = shown_commands()


def test_the_shown_commands_are_found() -> None:
    kinds = {words[0] for _, words, _ in COMMAND_LINES}
    assert kinds >= {"ase-mllm", "torchrun", "make", "python", "tensorboard"}, kinds
    assert any("configs/fsdp.yaml" in where for where, _, _ in COMMAND_LINES)
    assert any(w[0] == "torchrun" and "report" in w for _, w, _ in COMMAND_LINES)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("where,words,complete", COMMAND_LINES, ids=[w for w, _, _ in COMMAND_LINES])
def test_shown_command_parses_as_typed(where: str, words: list[str], complete: bool, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    words = list(words)
    for i, word in enumerate(words):  # a placeholder file (C.jsonl, IMAGE) becomes an existing one
        if re.fullmatch(r"[A-Z][A-Z_]*(\.[a-z]+)?", word) and not Path(word).exists():
            words[i] = str(tmp_path / word)
            Path(words[i]).touch()
    try:
        check(words, complete)
    except SystemExit as e:  # torchrun's parser prints its error and exits
        pytest.fail(f"{where}\n  torchrun refuses it (exit {e.code}); see its message above")
    except Exception as e:  # noqa: BLE001 (typer's usage errors and the assertions above)
        pytest.fail(f"{where}\n  {type(e).__name__}: {getattr(e, 'message', None) or e}")


def test_no_option_of_ours_is_one_torchrun_refuses() -> None:
    """torchrun's parser reads options after the script name too: one of ours that abbreviates two of its
    options (``--run``: ``--run-path``, ``--run_path``) stops every command that uses it."""
    from torch.distributed.run import get_args_parser

    theirs = [o for a in get_args_parser()._actions for o in a.option_strings if o.startswith("--")]
    clashes = []

    def walk(cmd, path: str) -> None:  # noqa: ANN001
        for param in cmd.params:
            opts = (*getattr(param, "opts", ()), *getattr(param, "secondary_opts", ()))
            ambiguous = {o: [t for t in theirs if t.startswith(o) and t != o] for o in opts}
            ambiguous = {o: m for o, m in ambiguous.items() if len(m) > 1}
            if ambiguous and len(ambiguous) == len(opts):  # no spelling of this option works under torchrun
                clashes.extend(f"{path} {o}: {m}" for o, m in ambiguous.items())
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "ase-mllm")
    # a short spelling torchrun refuses (--run) is kept only beside one it accepts (--run-name)
    assert clashes == []
