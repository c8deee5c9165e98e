"""Rich progress on stderr, rank 0 only; a no-op elsewhere."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr_console = Console(stderr=True)


class ProgressBar:
    """A one-task progress bar with a free-text status (losses, speed)."""

    def __init__(self, title: str, total: int, *, completed: int = 0, enabled: bool = True,
                 unit: str = "steps") -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(bar_width=24),
            MofNCompleteColumn(), TextColumn(unit), TimeElapsedColumn(), TextColumn("<"),
            TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
            console=stderr_console, disable=not enabled, transient=False,
        )
        self._task = self._progress.add_task(title, total=total, completed=completed, status="")

    def __enter__(self) -> ProgressBar:
        self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.stop()

    def update(self, completed: int, status: str | None = None) -> None:
        fields = {} if status is None else {"status": status}
        self._progress.update(self._task, completed=completed, **fields)
