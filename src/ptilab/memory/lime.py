"""Physical memory from a LiME dump (Linux Memory Extractor, the forensics world's format).

LiME's ``format=lime`` (src/lime.h, write_range() in src/main.c) writes, for
each "System RAM" range of /proc/iomem, a 32-byte header and the range's bytes::

    struct lime_mem_range_header {
        unsigned int magic;           0x4C694D45 ("EMiL" on disk)
        unsigned int version;         1
        unsigned long long s_addr;    first physical address
        unsigned long long e_addr;    last physical address (inclusive)
        unsigned char reserved[8];
    };

The ranges are the segments of an ELF core by another name, so the file is
read by ElfCore's frame machinery; only the headers differ. Overlapping
ranges are refused: two different bytes for one physical address leave no
right answer.
"""

from __future__ import annotations

import struct

from ptilab.errors import InputError
from ptilab.memory.elfcore import ElfCore, _Load

LIME_MAGIC = 0x4C694D45
LIME_VERSION = 1
RANGE_HEADER = struct.Struct("<IIQQ8x")


def is_lime(head: bytes) -> bool:
    """Do these first bytes of a file start a LiME range header?"""
    return len(head) >= 4 and struct.unpack_from("<I", head)[0] == LIME_MAGIC


class LimeImage(ElfCore):
    """Physical memory held in a LiME file's ranges.

    Attributes: path, segments (sorted ``(pa_start, pa_end)`` pairs); no CPU
    state and no VMCOREINFO note: LiME saves memory only, so ``vmcoreinfo``
    is the copy the kernel keeps in RAM, when the search finds it.
    """

    def _read_headers(self, f, size: int) -> tuple[list[_Load], list[tuple[int, int]]]:
        loads: list[_Load] = []
        at = 0
        while at < size:
            head = f.read(RANGE_HEADER.size)
            if len(head) < RANGE_HEADER.size:
                raise InputError(f"{self.path}: {len(head)} stray bytes after the last range at file offset "
                                 f"{at:#x}, not a 32-byte LiME header: truncated")
            magic, version, start, end = RANGE_HEADER.unpack(head)
            if magic != LIME_MAGIC:
                raise InputError(f"{self.path}: no LiME magic at file offset {at:#x} (found {magic:#010x}): "
                                 f"not a LiME range header")
            if version != LIME_VERSION:
                raise InputError(f"{self.path}: LiME header at file offset {at:#x} has version {version}; "
                                 f"only version {LIME_VERSION} is known")
            if end < start:
                raise InputError(f"{self.path}: LiME range at file offset {at:#x} ends ({end:#x}) "
                                 f"before it starts ({start:#x})")
            length = end - start + 1
            data_at = at + RANGE_HEADER.size
            if data_at + length > size:
                raise InputError(f"{self.path}: LiME range {start:#x}-{end:#x} runs to file offset "
                                 f"{data_at + length:#x}, past the end of the file ({size:#x}): truncated")
            loads.append(_Load(start, length, data_at, length))
            at = data_at + length
            f.seek(at)
        ordered = sorted(loads, key=lambda s: s.pa)
        for before, after in zip(ordered, ordered[1:]):
            if after.pa < before.end:
                raise InputError(f"{self.path}: LiME ranges {before.pa:#x}-{before.end - 1:#x} and "
                                 f"{after.pa:#x}-{after.end - 1:#x} overlap")
        if not loads:
            raise InputError(f"{self.path}: an empty file holds no LiME range")
        return loads, []

    def __repr__(self) -> str:
        return f"LimeImage({self.path!r}, {len(self.segments)} ranges)"
