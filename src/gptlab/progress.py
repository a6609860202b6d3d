"""Rich progress bars shared by prepare, train and sample; quiet when output is not a terminal."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

console = Console(stderr=True)


def _bar(counts: list, transient: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        *counts,
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=not console.is_terminal,  # a log file gets no half-drawn bars
    )


def progress_bar(transient: bool = False) -> Progress:
    """A progress bar with counts, elapsed and remaining time, drawn on stderr."""
    return _bar([MofNCompleteColumn()], transient)


def bytes_bar(transient: bool = False) -> Progress:
    """A progress bar over bytes of text, with MB done and MB/s, drawn on stderr."""
    return _bar([DownloadColumn(), TransferSpeedColumn()], transient)
