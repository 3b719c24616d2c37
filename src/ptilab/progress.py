"""Progress of long work, told to whoever listens: by default, nobody.

Library loops that can run for seconds (booting thousands of APs, an
NR_CPUS sweep, comparing the designs) report each step here; the CLI installs
a reporter that draws a bar on a terminal. The library never imports rich,
and with no reporter installed a step costs one context-variable lookup.

>>> from ptilab import progress
>>> class Printer:
...     def step(self, what, done, total): print(what, done, total)
>>> with progress.reporting(Printer()):
...     for cpu in progress.over(range(1, 3), "booting APs"):
...         pass
booting APs 0 2
booting APs 1 2
booting APs 2 2
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Collection, Iterator, Protocol, TypeVar

T = TypeVar("T")


class Reporter(Protocol):
    def step(self, what: str, done: int, total: int | None) -> None:
        """done of total units of the work called what are finished (total None: unknown).

        A step with done == total ends that work; the same what may start again later."""


_reporter: ContextVar[Reporter | None] = ContextVar("ptilab_progress_reporter", default=None)


def step(what: str, done: int, total: int | None) -> None:
    """Tell the current reporter, if any, that done of total units of what are finished."""
    reporter = _reporter.get()
    if reporter is not None:
        reporter.step(what, done, total)


def over(items: Collection[T], what: str) -> Iterator[T]:
    """Iterate over items, reporting a step before the first and after each one."""
    reporter = _reporter.get()
    if reporter is None:
        yield from items
        return
    total = len(items)
    reporter.step(what, 0, total)
    for done, item in enumerate(items, 1):
        yield item
        reporter.step(what, done, total)


@contextmanager
def reporting(reporter: Reporter | None) -> Iterator[Reporter | None]:
    """Send the steps of the work done inside the block to reporter (None: to nobody)."""
    token = _reporter.set(reporter)
    try:
        yield reporter
    finally:
        _reporter.reset(token)
