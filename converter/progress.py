"""Progress for long conversions: a rich progress display on a terminal, quiet log lines otherwise."""
from __future__ import annotations

import logging
import sys

log = logging.getLogger("remora.convert")


class Progress:
    """``with Progress(enabled) as p: p.phase("layer 1/3", total_bytes); p.advance(n)``."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._rich = None
        self._task = None

    def __enter__(self) -> "Progress":
        if self.enabled:
            from rich.progress import (BarColumn, DownloadColumn, Progress as RichProgress, TextColumn,
                                       TimeRemainingColumn, TransferSpeedColumn)

            self._rich = RichProgress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), TimeRemainingColumn(), transient=False)
            self._rich.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)

    def phase(self, description: str, total: int | None = None) -> None:
        log.info("%s%s", description, f" ({total} bytes)" if total else "")
        if self._rich is not None:
            if self._task is not None:
                self._rich.update(self._task, completed=self._rich.tasks[self._task].total or 0)
            self._task = self._rich.add_task(description, total=total)

    def advance(self, n: int) -> None:
        if self._rich is not None and self._task is not None:
            self._rich.advance(self._task, n)
