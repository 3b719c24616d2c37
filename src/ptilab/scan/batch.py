"""Many images at once: one task per image (or per chunk of one large
image), each a plain function of a path, so any worker can run it.

A task never raises for a bad image: it returns an ImageError, so one
unreadable file among hundreds costs its row, not the run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from ptilab.errors import InputError, PtilabError
from ptilab.scan import cluster, roots
from ptilab.scan.spaces import ImageScan, scan_image


@dataclass(frozen=True)
class ImageError:
    """An image a task could not read, and the one-line reason."""

    path: str
    message: str

    def as_dict(self) -> dict:
        return {"image": self.path, "error": self.message}


def image_bytes(path: str) -> int:
    """The bytes a scan of path reads: those the file system holds for it (a
    sparse image's holes are skipped, roots._data_rows), not its length."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError as ex:
        raise InputError(f"{path}: cannot read: {ex.strerror or ex}") from None


class AuditTask:
    """Audit one image as `ptilab audit IMAGE --json` would: the same dict."""

    def __init__(self, cpu: int | None, la57: bool | None, symbols: dict[str, int] | None):
        self.cpu, self.la57, self.symbols = cpu, la57, symbols

    def __call__(self, path: str) -> dict | ImageError:
        from ptilab.audit import audit
        from ptilab.audit.sources import views_from_image
        from ptilab.linux.paging_mode import image_root
        from ptilab.memory.images import open_image

        try:
            mem = open_image(path)
            cr3, geometry = image_root(mem, path, self.cpu, self.la57)
            found = views_from_image(mem, cr3, geometry, self.symbols)
            findings = audit(found.views)
        except PtilabError as ex:
            return ImageError(path, str(ex))
        return {"subject": f"{path} (CR3 {cr3:#x}, {geometry.levels}-level)", "image": path, "cr3": f"{cr3:#x}",
                "pti_pair": {"kernel_pgd": f"{found.pair.kernel_pgd:#x}", "user_pgd": f"{found.pair.user_pgd:#x}",
                             "is_pti": found.pair.is_pti, "reasons": list(found.pair.reasons)},
                "kaslr_slide": None if found.kaslr_slide is None else f"{found.kaslr_slide:#x}",
                "findings": [f.as_dict() for f in findings]}


class ScanTask:
    """Scan one whole image in the worker that runs it."""

    def __init__(self, la57: bool | None):
        self.la57 = la57

    def __call__(self, path: str) -> ImageScan | ImageError:
        try:
            return scan_image(path, self.la57)
        except PtilabError as ex:
            return ImageError(path, str(ex))


def audit_images(paths: Sequence[str], cpu: int | None, la57: bool | None, symbols: dict[str, int] | None,
                 scheduler: str | None = None, workers: int | None = None) -> list[dict | ImageError]:
    """Audit every image: on a cluster when there are several (or scheduler says where)."""
    with cluster.runner("auditing images", len(paths) > 1, scheduler, workers) as run:
        return run(AuditTask(cpu, la57, symbols), list(paths))


def scan_images(paths: Sequence[str], la57: bool | None, scheduler: str | None = None,
                workers: int | None = None, chunk_frames: int = roots.CHUNK_FRAMES) -> list[ImageScan | ImageError]:
    """Scan every image. Several: one task per image. One: in this process if
    small, else its chunks spread over the cluster's workers."""
    if len(paths) > 1:
        with cluster.runner("scanning images", True, scheduler, workers) as run:
            return run(ScanTask(la57), list(paths))
    path = paths[0]
    large = image_bytes(path) >= cluster.LARGE_IMAGE_BYTES
    with cluster.runner(f"scanning {os.path.basename(path)}", large, scheduler, workers) as run:
        return [scan_image(path, la57, run, chunk_frames)]
