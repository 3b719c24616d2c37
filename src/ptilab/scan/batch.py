"""Many images at once: one task per image (or per chunk of one large
image), each a plain function of a path, so any worker can run it.

A task never raises for a bad image: it returns an ImageError, so one
unreadable file among hundreds costs its row, not the run.
"""

from __future__ import annotations

import os
from typing import Sequence

from ptilab.audit.image import ImageAudit, ImageError, audit_image_file
from ptilab.errors import InputError, PtilabError
from ptilab.linux.exposure import Meltdown
from ptilab.scan import cluster, roots
from ptilab.scan.spaces import ImageScan, scan_image


def image_bytes(path: str) -> int:
    """The bytes a scan of path reads: those the file system holds for it (a
    sparse image's holes are skipped, roots._data_rows), not its length."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError as ex:
        raise InputError(f"{path}: cannot read: {ex.strerror or ex}") from None


class AuditTask:
    """Audit one image as `ptilab audit IMAGE` would: the same result, without its walks."""

    def __init__(self, cpu: int | None, la57: bool | None, symbols: dict[str, int] | None,
                 stated: Meltdown | None = None):
        self.cpu, self.la57, self.symbols, self.stated = cpu, la57, symbols, stated

    def __call__(self, path: str) -> ImageAudit | ImageError:
        try:
            return audit_image_file(path, self.cpu, self.la57, self.symbols, self.stated).without_walks()
        except PtilabError as ex:
            return ImageError(path, str(ex))


class ScanTask:
    """Scan one whole image in the worker that runs it."""

    def __init__(self, la57: bool | None, stated: Meltdown | None = None):
        self.la57, self.stated = la57, stated

    def __call__(self, path: str) -> ImageScan | ImageError:
        try:
            return scan_image(path, self.la57, stated=self.stated)
        except PtilabError as ex:
            return ImageError(path, str(ex))


def audit_images(paths: Sequence[str], cpu: int | None, la57: bool | None, symbols: dict[str, int] | None,
                 stated: Meltdown | None = None, scheduler: str | None = None,
                 workers: int | None = None) -> list[ImageAudit | ImageError]:
    """Audit every image: on a cluster where asked, or where the work measured is worth one (cluster.map_items)."""
    return cluster.map_items("auditing images", AuditTask(cpu, la57, symbols, stated), paths, scheduler, workers)


def scan_images(paths: Sequence[str], la57: bool | None, scheduler: str | None = None,
                workers: int | None = None, chunk_frames: int = roots.CHUNK_FRAMES,
                stated: Meltdown | None = None) -> list[ImageScan | ImageError]:
    """Scan every image. Several: one task per image (cluster.map_items). One: in
    this process if small, else its chunks spread over the cluster's workers."""
    if len(paths) > 1:
        return cluster.map_items("scanning images", ScanTask(la57, stated), paths, scheduler, workers)
    path = paths[0]
    large = image_bytes(path) >= cluster.LARGE_IMAGE_BYTES
    with cluster.runner(f"scanning {os.path.basename(path)}", large, scheduler, workers) as run:
        return [scan_image(path, la57, run, chunk_frames, stated)]
