"""Writers of the dump formats ptilab reads, for tests and fuzz seeds only.

write_kdump() lays a file out as makedumpfile's write_kdump_header(),
write_kdump_bitmap() and write_kdump_pages() do (diskdump_mod.h layout; plain
or, as QEMU 7.2's dump-guest-memory -z writes it, flattened); write_lime()
as LiME's write_range() does. The real files from the real tools are in the
pti-kaslr fixture; these make the small and the broken ones.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

from ptilab.memory.elfwrite import _note_bytes

BLOCK = 4096
COMPRESS = {
    "none": (0, lambda b: b),
    "zlib": (0x1, zlib.compress),
    "lzo": (0x2, lambda b: __import__("lzallright").LZOCompressor().compress(b)),
    "snappy": (0x4, lambda b: bytes(__import__("cramjam").snappy.compress_raw(b))),
    "zstd": (0x20, lambda b: bytes(__import__("cramjam").zstd.compress(b))),
}
LIME_MAGIC = 0x4C694D45


def kdump_bytes(frames: Mapping[int, bytes], max_pfn: int, compression: str = "zlib",
                notes: Iterable = (), vmcoreinfo: str = "", release: str = "6.1.0-test",
                header_version: int = 6, existing: Iterable[int] = ()) -> bytes:
    """A kdump-compressed file holding frames (pfn -> 4096 bytes) of a machine
    with max_pfn frames; existing frames not in frames are in the first
    bitmap only (excluded, as makedumpfile's dump level excludes them)."""
    flag, squeeze = COMPRESS[compression]
    note_blob = _note_bytes(notes)
    info = vmcoreinfo.encode()
    sub_blocks = -(-(48 + 12 * 8 + len(info) + len(note_blob) + 1) // BLOCK)
    bitmap_half = -(-max(max_pfn, 1) // (8 * BLOCK)) * BLOCK
    bitmap1, bitmap2 = bytearray(bitmap_half), bytearray(bitmap_half)
    for pfn in set(existing) | set(frames):
        bitmap1[pfn >> 3] |= 1 << (pfn & 7)
    for pfn in frames:
        bitmap2[pfn >> 3] |= 1 << (pfn & 7)
    desc_at = (1 + sub_blocks + 2 * bitmap_half // BLOCK) * BLOCK
    data_at = desc_at + 24 * len(frames)
    descs, pages = bytearray(), bytearray()
    for pfn in sorted(frames):
        page = frames[pfn]
        packed = squeeze(page)
        if flag and len(packed) >= len(page):  # makedumpfile stores a page raw when it does not shrink
            packed, this_flag = page, 0
        else:
            this_flag = flag
        descs += struct.pack("<QIIQ", data_at + len(pages), len(packed), this_flag, 0)
        pages += packed
    header = bytearray(BLOCK)
    header[0:8] = b"KDUMP   "
    struct.pack_into("<I", header, 8, header_version)
    header[12 + 130:12 + 130 + len(release)] = release.encode()
    struct.pack_into("<10I", header, 424, 0, BLOCK, sub_blocks, 2 * bitmap_half // BLOCK, min(max_pfn, 0xFFFFFFFF),
                     len(frames), 0, 0, 0, 1)
    sub = bytearray(sub_blocks * BLOCK)
    info_at = BLOCK + 112
    note_at = info_at + len(info)
    struct.pack_into("<QIIQQQQQQQQQQQ", sub, 0, 0, 31, 0, 0, max_pfn, info_at, len(info), note_at,
                     len(note_blob), 0, 0, 0, max_pfn, max_pfn)
    sub[112:112 + len(info)] = info
    sub[112 + len(info):112 + len(info) + len(note_blob)] = note_blob
    return bytes(header + sub + bitmap1 + bitmap2 + descs + pages)


def flatten(data: bytes, chunk: int = 3 * BLOCK + 5) -> bytes:
    """makedumpfile -F's stream of the same file: a 4 KiB "makedumpfile" header,
    then {be64 offset, be64 size, bytes} records (written out of order, as a
    dump that writes descriptors and pages in two passes does), then -1, -1."""
    head = bytearray(BLOCK)
    head[0:12] = b"makedumpfile"
    struct.pack_into(">qq", head, 16, 1, 1)
    cuts = list(range(0, len(data), chunk))
    out = bytearray(head)
    for at in cuts[1:] + cuts[:1]:
        part = data[at:at + chunk]
        out += struct.pack(">qq", at, len(part)) + part
    return bytes(out + struct.pack(">qq", -1, -1))


def write_kdump(path: str | Path, frames: Mapping[int, bytes], max_pfn: int, *, flattened: bool = False,
                **kwargs) -> Path:
    data = kdump_bytes(frames, max_pfn, **kwargs)
    Path(path).write_bytes(flatten(data) if flattened else data)
    return Path(path)


def lime_bytes(ranges: Iterable[tuple[int, bytes]]) -> bytes:
    """LiME's format: per range a lime_mem_range_header (magic, version 1,
    start, end inclusive, 8 reserved bytes) and the range's bytes."""
    out = bytearray()
    for start, data in ranges:
        out += struct.pack("<IIQQ8x", LIME_MAGIC, 1, start, start + len(data) - 1) + data
    return bytes(out)
