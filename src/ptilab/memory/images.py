"""Opening a memory image from disk: the one way in, whatever its format."""

from __future__ import annotations

import os

from ptilab.errors import InputError, UsageError
from ptilab.memory.elfcore import ElfCore
from ptilab.memory.physical import PhysicalMemory
from ptilab.memory.raw import RawImage

ELF_MAGIC = b"\x7fELF"


def open_image(path: str | os.PathLike[str], base: int | None = None) -> PhysicalMemory:
    """Open a physical memory image: an ELF core if the file starts with the
    ELF magic (QEMU ``dump-guest-memory``, kdump vmcore), else a raw image
    whose first byte is physical address ``base`` (0 by default).

    An ELF core places its segments itself, so ``base`` is refused for one.
    Raises InputError for a missing, unreadable or malformed file.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(len(ELF_MAGIC))
    except OSError as ex:
        raise InputError(f"{path}: cannot read: {ex.strerror or ex}") from None
    if magic == ELF_MAGIC:
        if base is not None:
            raise UsageError(f"{path}: is an ELF core, whose segments carry their own physical "
                             f"addresses; a base applies only to raw images")
        return ElfCore(path)
    return RawImage(path, 0 if base is None else base)
