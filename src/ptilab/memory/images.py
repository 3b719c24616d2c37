"""Opening a memory image from disk: the one way in, whatever its format."""

from __future__ import annotations

import os

from ptilab.errors import UsageError
from ptilab.files import open_input, require_image_file
from ptilab.memory.elfcore import ElfCore
from ptilab.memory.kdump import FLAT_SIGNATURE, KDUMP_SIGNATURE, KdumpCompressed
from ptilab.memory.lime import LimeImage, is_lime
from ptilab.memory.physical import PhysicalMemory
from ptilab.memory.raw import RawImage

ELF_MAGIC = b"\x7fELF"


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
        kind = dump_format(f.read(len(FLAT_SIGNATURE)))
    if kind and base is not None:
        raise UsageError(f"{path}: is {kind}, which carries its own physical addresses; "
                         f"a base applies only to raw images")
    if kind == "an ELF core":
        return ElfCore(path)
    if kind == "a LiME dump":
        return LimeImage(path)
    if kind:
        return KdumpCompressed(path)
    return RawImage(path, 0 if base is None else base)


def dump_format(head: bytes) -> str | None:
    """Which dump format a file's first bytes announce ("an ELF core", "a
    kdump-compressed dump", "a LiME dump"), or None for a raw image."""
    if head.startswith(ELF_MAGIC):
        return "an ELF core"
    if head.startswith(KDUMP_SIGNATURE) or head.startswith(FLAT_SIGNATURE):
        return "a kdump-compressed dump"
    return "a LiME dump" if is_lime(head) else None
