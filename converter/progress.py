"""Progress for long conversions: a rich progress display on a terminal, quiet log lines otherwise."""
from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)


class Progress:
    """``with Progress(enabled) as p: p.phase("layer 1/3", total_bytes); p.advance(n)``."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._rich = None
        self._task = None

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), TimeRemainingColumn(), transient=False)
            self._rich.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._rich is not None:
            if exc[0] is None:
                self._finish_row()
            self._rich.__exit__(*exc)

    def phase(self, description: str, total: int | None = None) -> None:
        """Start the next row; the previous one is shown finished (its total, or what it counted
        when it had none, so no row stays at ``0/?``)."""
        log.info("%s%s", description, f" ({total} bytes)" if total else "")
        if self._rich is not None:
            self._finish_row()
            self._task = self._rich.add_task(description, total=total)

    def complete(self, total: int) -> None:
        """The current row is done and ``total`` is what it really amounted to."""
        if self._rich is not None and self._task is not None:
            self._rich.update(self._task, total=total, completed=total)

    def _finish_row(self) -> None:
        if self._task is not None:
            task = self._rich.tasks[self._task]
            total = task.total if task.total is not None else task.completed
            self._rich.update(self._task, total=total, completed=total)

    def advance(self, n: int) -> None:
        if self._rich is not None and self._task is not None:
            self._rich.advance(self._task, n)
