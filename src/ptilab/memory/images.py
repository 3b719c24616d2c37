"""Opening a memory image from disk: the one way in, whatever its format."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from ptilab.errors import UsageError
from ptilab.files import open_input, require_image_file
from ptilab.memory.elfcore import ElfCore
from ptilab.memory.kdump import FLAT_SIGNATURE, KDUMP_SIGNATURE, KdumpCompressed
from ptilab.memory.lime import LimeImage, is_lime
from ptilab.memory.physical import PhysicalMemory
from ptilab.memory.raw import RawImage

ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True)
class DumpFormat:
    """A dump format ptilab reads: what it is called in messages, the test its
    first bytes pass, and the reader that opens it."""

    name: str
    sniff: Callable[[bytes], bool]
    reader: Callable[[str], PhysicalMemory]


# Tried in order; a file no format claims is a raw image.
FORMATS = (
    DumpFormat("an ELF core", lambda head: head.startswith(ELF_MAGIC), ElfCore),
    DumpFormat("a kdump-compressed dump",
               lambda head: head.startswith(KDUMP_SIGNATURE) or head.startswith(FLAT_SIGNATURE), KdumpCompressed),
    DumpFormat("a LiME dump", is_lime, LimeImage),
)
HEAD_BYTES = max(len(ELF_MAGIC), len(KDUMP_SIGNATURE), len(FLAT_SIGNATURE), 4)


def open_image(path: str | os.PathLike[str], base: int | None = None) -> PhysicalMemory:
    """Open a physical memory image by its first bytes: an ELF core (QEMU
    ``dump-guest-memory``, kdump vmcore), a kdump-compressed dump ("KDUMP   ",
    or makedumpfile's flattened "makedumpfile"), a LiME dump (its range
    header's magic), else a raw image whose first byte is physical address
    ``base`` (0 by default).

    A dump format places its frames itself, so ``base`` is refused for one.
    Raises InputError for a missing, unreadable or malformed file, or one that
    is no regular file or block device.
    """
    path = os.fspath(path)
    require_image_file(path)
    with open_input(path) as f:
        kind = format_of(f.read(HEAD_BYTES))
    if kind is None:
        return RawImage(path, 0 if base is None else base)
    if base is not None:
        raise UsageError(f"{path}: is {kind.name}, which carries its own physical addresses; "
                         f"a base applies only to raw images")
    return kind.reader(path)


def format_of(head: bytes) -> DumpFormat | None:
    """The dump format a file's first bytes announce, or None for a raw image."""
    return next((kind for kind in FORMATS if kind.sniff(head)), None)


def dump_format(head: bytes) -> str | None:
    """Which dump format a file's first bytes announce ("an ELF core", "a
    kdump-compressed dump", "a LiME dump"), or None for a raw image."""
    kind = format_of(head)
    return None if kind is None else kind.name
