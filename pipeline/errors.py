"""Errors the user can act on: the CLI prints their message alone (``ASE_DEBUG=1`` shows the traceback)."""
from __future__ import annotations

from typing import NoReturn


class PipelineError(RuntimeError):
    """A problem with inputs, configuration or stage order; the message says what to do."""


def fail(message: str) -> NoReturn:
    """End a CLI command with one red ``error:`` line and exit status 1."""
    import typer

    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)
