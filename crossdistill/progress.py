"""One place that builds the rich progress bar used by long-running jobs."""

from __future__ import annotations

import sys

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress(disable: bool | None = None) -> Progress:
    """A rich progress bar; hidden automatically when stderr is not a terminal."""
    if disable is None:
        disable = not sys.stderr.isatty()
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=disable,
        transient=False,
    )
