"""Where the work runs: in this process, on an embedded local Dask cluster
of worker processes, or on an existing cluster at a scheduler address.

A runner maps a function over items and returns the results in order,
reporting each finished item to ptilab.progress. Tasks carry paths and
frame numbers, never image bytes: every worker opens (and maps) the file
itself, so with --scheduler the images must be on a path every worker can
read. dask.distributed is imported only here, and only when a cluster is
asked for.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from ptilab import progress
from ptilab.errors import UsageError

Runner = Callable[[Callable, Sequence], list]
# Below this much image data one process scans faster than a cluster starts (about 2 s).
LARGE_IMAGE_BYTES = 8 << 30
# A local cluster's start and stop on a 2-core machine: 16 fixture audits took 1.60 s on one,
# 0.72 s in this process.
CLUSTER_START_SECONDS = 2.0
CONNECT_TIMEOUT = "10s"


def in_process(what: str) -> Runner:
    """Run the items one after another here."""
    def run(fn: Callable, items: Sequence) -> list:
        return [fn(item) for item in progress.over(items, what)]
    return run


def map_items(what: str, fn: Callable, items: Sequence, scheduler: str | None = None,
              workers: int | None = None) -> list:
    """fn over items, results in order: on the cluster asked for (scheduler, or
    workers > 0), here with workers 0; else by the work measured: the first
    item here, timed, and the rest on a local cluster only when they would take
    longer here than the cluster's start-up plus their share of its workers."""
    items = list(items)
    if scheduler or workers:
        with dask_runner(what, scheduler, workers) as run:
            return run(fn, items)
    cpus = os.cpu_count() or 1
    if workers == 0 or len(items) < 2 or cpus < 2:
        return in_process(what)(fn, items)
    started = time.perf_counter()
    first = fn(items[0])
    here = (time.perf_counter() - started) * (len(items) - 1)
    if here - here / cpus <= CLUSTER_START_SECONDS:
        return [first, *in_process(what)(fn, items[1:])]
    with dask_runner(what) as run:
        return [first, *run(fn, items[1:])]


@contextmanager
def dask_runner(what: str, scheduler: str | None = None, workers: int | None = None) -> Iterator[Runner]:
    """A runner on dask.distributed: the cluster at scheduler (tcp://HOST:PORT),
    or a LocalCluster of worker processes (one thread each: the scan is numpy
    bound and holds the GIL between calls) for the duration of the block."""
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:  # pragma: no cover - a dependency, but say so plainly
        raise UsageError("the cluster needs dask.distributed: pip install 'distributed'") from None

    with _quiet_dask():
        if scheduler:
            try:
                client = Client(scheduler, timeout=CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as ex:
                raise UsageError(f"--scheduler {scheduler}: cannot connect: {ex}") from None
            cluster = None
        else:
            cluster = LocalCluster(n_workers=workers or os.cpu_count() or 1, threads_per_worker=1,
                                   processes=True, dashboard_address=":0")
            client = Client(cluster)

    def run(fn: Callable, items: Sequence) -> list:
        futures = client.map(fn, list(items), pure=False)
        progress.step(what, 0, len(futures))
        for done, _ in enumerate(as_completed(futures), 1):
            progress.step(what, done, len(futures))
        return client.gather(futures)

    try:
        yield run
    finally:
        with _quiet_dask():
            client.close()
            if cluster is not None:
                cluster.close()


@contextmanager
def runner(what: str, distribute: bool, scheduler: str | None = None, workers: int | None = None
           ) -> Iterator[Runner]:
    """A cluster when asked for one (scheduler) or when distribute says the
    work is worth one (several images, a large image) and workers is not 0;
    else this process."""
    if scheduler or (distribute and workers != 0):
        with dask_runner(what, scheduler, workers) as run:
            yield run
    else:
        yield in_process(what)


@contextmanager
def _quiet_dask() -> Iterator[None]:
    """Keep distributed's start-up and shut-down chatter off the CLI's stderr."""
    import logging
    import warnings

    loggers = [logging.getLogger(name) for name in ("distributed", "dask")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Port 8787 is already in use" and the like
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
