"""Errors the user can act on: the CLI prints their message alone (``ASE_DEBUG=1`` shows the traceback)."""
from __future__ import annotations


class PipelineError(RuntimeError):
    """A problem with inputs, configuration or stage order; the message says what to do."""
