"""Progress on stderr, rank 0 only: a rich bar on a terminal, plain lines in a log.

A log (stderr a file or a pipe: CI, `nohup`, a cluster job) cannot show a redrawn bar, so there
each report is one whole line, printed every `PLAIN_EVERY_S` seconds and at every tenth of the
work (and at the end):

    distill  step 300/1500  20.0%  images/s 41.2  eta 0:04:51  loss 0.0213  out 0.011 vel 0.004 sc 0.006
"""

from __future__ import annotations

import datetime
import math
import sys
import time
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

# Plain lines: at least this often (seconds), and each time another 1 / PLAIN_PARTS of the
# work is done.
PLAIN_EVERY_S = 10.0
PLAIN_PARTS = 10
# A rate measured over less than this many seconds is too noisy: the average since the start
# is shown instead.
MIN_RATE_WINDOW_S = 1.0


def format_metrics(metrics: dict[str, float]) -> str:
    """`loss 0.0213  out 0.011 vel 0.004 sc 0.006  grad_norm 0.35`: the loss, its terms (the
    `loss_*` metrics, named by their term) as one group, then the other metrics."""
    loss = [f"loss {metrics['loss']:.4g}"] if "loss" in metrics else []
    terms = " ".join(f"{name.removeprefix('loss_')} {value:.4g}"
                     for name, value in metrics.items() if name.startswith("loss_"))
    rest = [f"{name} {value:.4g}" for name, value in metrics.items()
            if name != "loss" and not name.startswith("loss_")]
    return "  ".join(loss + ([terms] if terms else []) + rest)


def format_eta(seconds: float | None) -> str:
    """H:MM:SS, or `?` while no rate is known."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


def plain_output() -> bool:
    """Whether progress should be plain lines: stderr is not a terminal (nor a notebook)."""
    return not (stderr_console.is_terminal or stderr_console.is_jupyter) or (
        stderr_console.is_dumb_terminal)


class ProgressBar:
    """Progress of one job: `completed` of `total` units (steps, samples, images), with the
    rate of images (`per_unit` per unit) and the latest metrics (losses) when given."""

    def __init__(self, title: str, total: int, *, completed: int = 0, enabled: bool = True,
                 unit: str = "step", per_unit: int = 1, rate_unit: str = "images") -> None:
        self.title, self.total, self.unit = title, total, unit
        self.per_unit, self.rate_unit = per_unit, rate_unit
        self.enabled = enabled
        self.plain = enabled and plain_output()
        self._metrics: dict[str, float] = {}
        self._start = (time.monotonic(), completed)
        self._last = self._start  # (time, completed) of the last plain line
        self._tenth = self._tenths(completed)
        self._progress: Progress | None = None
        if enabled and not self.plain:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(bar_width=24),
                MofNCompleteColumn(), TextColumn(f"{unit}s"), TimeElapsedColumn(),
                TextColumn("<"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                console=stderr_console, transient=False)
            self._task = self._progress.add_task(title, total=total, completed=completed,
                                                 status="")

    def __enter__(self) -> ProgressBar:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, completed: int, metrics: dict[str, float] | None = None) -> None:
        """Report `completed` units done; `metrics` (e.g. the losses of a log tick) are kept
        and shown until the next ones."""
        if not self.enabled:
            return
        if metrics is not None:
            self._metrics = dict(metrics)
        if self._progress is not None:
            fields = {} if metrics is None else {"status": self._status(completed)}
            self._progress.update(self._task, completed=completed, **fields)
            return
        now = time.monotonic()
        tenth = self._tenths(completed)
        if completed >= self.total or tenth > self._tenth or now - self._last[0] >= PLAIN_EVERY_S:
            sys.stderr.write(self.line(completed, now) + "\n")
            sys.stderr.flush()
            self._last, self._tenth = (now, completed), tenth

    def line(self, completed: int, now: float | None = None) -> str:
        """The plain report: title, units done/total, percent, rate, ETA, metrics; one line."""
        now = time.monotonic() if now is None else now
        units_per_s = self._units_per_s(completed, now)
        percent = 100.0 * completed / self.total if self.total else 100.0
        eta = ((self.total - completed) / units_per_s if units_per_s else
               (0.0 if completed >= self.total else None))
        parts = [self.title, f"{self.unit} {completed}/{self.total}", f"{percent:.1f}%",
                 f"{self.rate_unit}/s {self._rate_text(units_per_s)}", f"eta {format_eta(eta)}"]
        if self._metrics:
            parts.append(format_metrics(self._metrics))
        return "  ".join(parts)

    def _status(self, completed: int) -> str:
        rate = self._units_per_s(completed, time.monotonic())
        text = f"{self.rate_unit}/s {self._rate_text(rate)}"
        return "  ".join([text, format_metrics(self._metrics)]) if self._metrics else text

    def _rate_text(self, units_per_s: float | None) -> str:
        return "?" if units_per_s is None else f"{units_per_s * self.per_unit:.1f}"

    def _units_per_s(self, completed: int, now: float) -> float | None:
        """Units per second since the last line (since the start when that is too short)."""
        for since, done in (self._last, self._start):
            if now - since >= MIN_RATE_WINDOW_S and completed > done:
                return (completed - done) / (now - since)
        since, done = self._start
        return (completed - done) / (now - since) if now > since and completed > done else None

    def _tenths(self, completed: int) -> int:
        return completed * PLAIN_PARTS // self.total if self.total else 0
