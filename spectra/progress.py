"""Progress bars: stages inside a long step (a drift round) and probe loops, on a terminal's stderr only."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from rich.progress import Progress

T = TypeVar("T")

#: Called with how many units of a stage are done since the last call.
Advance = Callable[[int], None]


def stderr_progress(*columns: Any, **options: Any) -> "Progress":
    """A rich ``Progress`` that draws on stderr: stdout carries the command's table, CSV or JSON."""
    from rich.console import Console
    from rich.progress import Progress

    return Progress(*columns, console=Console(stderr=True), **options)


class Stages(Protocol):
    """Reports the stages of a step: ``with stages.stage("z optimisation", total) as advance: ... advance(1)``."""

    def stage(self, description: str, total: int) -> AbstractContextManager[Advance]: ...


class NoStages:
    """Stages that show nothing (a run without a terminal, tests, the Python API)."""

    @contextmanager
    def stage(self, description: str, total: int) -> Iterator[Advance]:
        """A stage whose progress goes nowhere."""
        yield lambda done=1: None


class ConsoleStages:
    """One transient rich bar per stage on stderr, with elapsed time and ETA; shown only when stderr is a terminal.

    Bars are transient, so the round's own console line (printed after the stages) is never
    interleaved with them, and a log file or pipe gets no bar at all.
    """

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    @contextmanager
    def stage(self, description: str, total: int) -> Iterator[Advance]:
        """A bar for ``total`` units of ``description``; yields the function that advances it."""
        if not self.enabled:
            yield lambda done=1: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn())
        with stderr_progress(*columns, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda done=1: bar.advance(task, done)


def progress_iter(items: Iterable[T], description: str, enabled: bool | None = None) -> Iterator[T]:
    """Iterate over ``items`` with a transient rich bar on stderr (shown only on a terminal, or when ``enabled``).

    The bar never goes to stdout, which carries the command's table, CSV or JSON.
    """
    if enabled is False or (enabled is None and not sys.stderr.isatty()):
        yield from items
        return
    with stderr_progress(transient=True) as bar:
        yield from bar.track(items, description=description)
