"""Physical memory from a kdump-compressed dump: makedumpfile's "diskdump" format.

What ``makedumpfile -c/-l/-p/-z`` writes from a kdump vmcore and QEMU's
``dump-guest-memory -z/-l/-s`` writes of a guest (makedumpfile's
diskdump_mod.h, QEMU's include/sysemu/dump.h)::

    block 0                      struct disk_dump_header: "KDUMP   ", header_version,
                                 utsname, status, block_size, sub_hdr_size (blocks),
                                 bitmap_blocks, max_mapnr, ..., nr_cpus
    block 1 ..                   struct kdump_sub_header: phys_base, dump_level, ...,
                                 offset/size of VMCOREINFO and of the ELF notes,
                                 max_mapnr_64 (header_version 6+); the notes follow
    1 + sub_hdr_size             two bitmaps of bitmap_blocks / 2 blocks each: bit pfn
                                 of the first says the frame exists, of the second
                                 that it was dumped
    then                         struct page_desc {offset, size, flags, page_flags}
                                 for each dumped frame, in frame order
    then                         the pages: raw when flags say no compression and size
                                 is block_size, else compressed (zlib, lzo, snappy, zstd)

makedumpfile's flattened variant (``-F``, for piping over ssh) is the same
file cut into records, each ``{be64 offset, be64 size}`` then the bytes, after
a 4 KiB "makedumpfile" header: it is read through an index of its records.

Lazy: opening reads the headers and the second bitmap (one bit per frame);
a frame's descriptor and its compressed bytes are read, and decompressed,
only when a walk asks for that frame, and kept in a bounded LRU cache.
A frame that exists but was excluded from the dump (makedumpfile's dump
level: zero, cache, user or free pages) is absent, as it is to crash and
libkdumpfile: nothing is invented for it.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
import zlib
from collections import OrderedDict

import numpy as np

from ptilab.errors import FrameOutsideMemory, InputError
from ptilab.memory.elfcore import CoreNotes
from ptilab.memory.physical import ENTRY_DTYPE, PhysicalMemory
from ptilab.paging.entry import PAGE_SHIFT, PAGE_SIZE

KDUMP_SIGNATURE = b"KDUMP   "
FLAT_SIGNATURE = b"makedumpfile\0\0\0\0"
FLAT_HEADER_SIZE = 4096  # MAX_SIZE_MDF_HEADER
UTS_RELEASE_AT = 12 + 2 * 65  # after signature, header_version, sysname, nodename
# struct disk_dump_header after the 22-byte timestamp (a timeval, padded): ten u32.
HEADER_FIELDS = struct.Struct("<10I")
HEADER_FIELDS_AT = 424
# struct kdump_sub_header (64-bit): phys_base, dump_level, split, start_pfn, end_pfn,
# offset/size_vmcoreinfo, offset/size_note, offset/size_eraseinfo, start/end_pfn_64, max_mapnr_64.
SUB_HEADER = struct.Struct("<QIIQQQQQQQQQQQ")
PAGE_DESC = struct.Struct("<QIIQ")

DUMP_DH_COMPRESSED_ZLIB = 0x1
DUMP_DH_COMPRESSED_LZO = 0x2
DUMP_DH_COMPRESSED_SNAPPY = 0x4
DUMP_DH_COMPRESSED_ZSTD = 0x20
DUMP_HEADER_INCOMPLETED = 0x1
DEFAULT_CACHE_PAGES = 4096  # 16 MiB of decompressed frames

U64 = (1 << 64) - 1
POPCOUNT8 = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)


class _Plain:
    """The dump file as it lies on disk."""

    def __init__(self, mm: mmap.mmap):
        self.mm = mm
        self.size = len(mm)

    def read(self, offset: int, length: int) -> bytes:
        return self.mm[offset:offset + length]


class _Flattened:
    """makedumpfile -F's stream: records {be64 offset, be64 size, bytes} after a 4 KiB header."""

    RECORD = struct.Struct(">qq")

    def __init__(self, mm: mmap.mmap, fd: int, path: str):
        self.mm = mm
        starts, ends, at_file = [], [], []
        at = FLAT_HEADER_SIZE
        while True:
            # pread, not the mapping: touching a page per record would map (and
            # count in the RSS) the whole file, which the reads never need.
            head = os.pread(fd, self.RECORD.size, at)
            if len(head) < self.RECORD.size:
                raise InputError(f"{path}: flattened dump ends without its end marker: truncated")
            offset, size = self.RECORD.unpack(head)
            if offset == -1 and size == -1:
                break
            at += self.RECORD.size
            if offset < 0 or size < 0 or at + size > len(mm):
                raise InputError(f"{path}: flattened record at file offset {at - 16:#x} runs past the end of the file")
            starts.append(offset)
            ends.append(offset + size)
            at_file.append(at)
            at += size
        order = sorted(range(len(starts)), key=starts.__getitem__)
        self.starts = [starts[i] for i in order]
        self.ends = [ends[i] for i in order]
        self.at_file = [at_file[i] for i in order]
        self.size = max(self.ends, default=0)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the reassembled file; a gap (never written) reads as nothing further."""
        out = bytearray()
        while length > 0:
            i = bisect.bisect_right(self.starts, offset) - 1
            if i < 0 or offset >= self.ends[i]:
                break
            take = min(length, self.ends[i] - offset)
            start = self.at_file[i] + offset - self.starts[i]
            out += self.mm[start:start + take]
            offset += take
            length -= take
        return bytes(out)


class KdumpCompressed(PhysicalMemory):
    """Physical memory held in a kdump-compressed file (plain or flattened).

    Attributes:
        path: the file.
        release: the kernel's ``uname -r`` from the header's utsname.
        header_version, dump_level, phys_base: from the headers.
        max_pfn: one past the highest frame number the dump describes.
        cpus: QEMU's per-CPU states when QEMU wrote the dump, else ().
        vmcoreinfo_text, prstatus_cpus: as for an ElfCore (the header's VMCOREINFO when no note has one).
        flattened: the file is makedumpfile's flattened stream.
    """

    def __init__(self, path: str | os.PathLike[str], cache_pages: int = DEFAULT_CACHE_PAGES):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 2 * PAGE_SIZE:
                    raise InputError(f"{self.path}: {size} bytes, too short for a kdump-compressed header: truncated")
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self.flattened = self._mmap[:len(FLAT_SIGNATURE)] == FLAT_SIGNATURE
                self._file = _Flattened(self._mmap, f.fileno(), self.path) if self.flattened else _Plain(self._mmap)
        except OSError as ex:
            raise InputError(f"{self.path}: cannot read: {ex.strerror or ex}") from None
        self._read_headers()
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_pages = max(1, cache_pages)
        self.decompressed = 0  # frames decompressed so far: what laziness saves is counted

    # -- headers ------------------------------------------------------------

    def _bytes(self, offset: int, length: int, what: str) -> bytes:
        data = self._file.read(offset, length)
        if len(data) != length:
            raise InputError(f"{self.path}: {what} (file offset {offset:#x}, {length} bytes) "
                             f"runs past the end of the file: truncated")
        return data

    def _read_headers(self) -> None:
        head = self._bytes(0, HEADER_FIELDS_AT + HEADER_FIELDS.size, "the disk_dump_header")
        if head[:8] != KDUMP_SIGNATURE:
            raise InputError(f"{self.path}: no \"KDUMP   \" signature: not a kdump-compressed dump")
        (self.header_version,) = struct.unpack_from("<I", head, 8)
        self.release = head[UTS_RELEASE_AT:UTS_RELEASE_AT + 65].split(b"\0")[0].decode("ascii", "replace")
        (self.status, block_size, sub_blocks, bitmap_blocks, max_mapnr, *_rest, self.nr_cpus) = \
            HEADER_FIELDS.unpack_from(head, HEADER_FIELDS_AT)
        if block_size != PAGE_SIZE:
            raise InputError(f"{self.path}: block size {block_size}, not the 4096 of an x86-64 dump")
        sub = SUB_HEADER.unpack(self._bytes(block_size, SUB_HEADER.size, "the kdump_sub_header"))
        self.phys_base, self.dump_level = sub[0], sub[1]
        vmcoreinfo_at, vmcoreinfo_size, note_at, note_size = sub[5:9]
        self.max_pfn = sub[13] if self.header_version >= 6 else max_mapnr
        notes = CoreNotes()
        if self.header_version >= 4 and note_size:
            notes.add(self._bytes(note_at, note_size, "the ELF notes"), self.path)
        if self.header_version >= 3 and vmcoreinfo_size and not notes.vmcoreinfo_text:
            notes.add(_vmcoreinfo_note(self._bytes(vmcoreinfo_at, vmcoreinfo_size, "the VMCOREINFO")), self.path)
        self.cpus = tuple(notes.cpus)
        self.vmcoreinfo_text = notes.vmcoreinfo_text
        self.prstatus_cpus = notes.prstatus_cpus
        self._read_bitmap((1 + sub_blocks) * block_size, bitmap_blocks * block_size)

    def _read_bitmap(self, offset: int, length: int) -> None:
        """The second (dumped) bitmap, and per 64-bit word the count of dumped
        frames before it: a frame's descriptor index is a popcount away."""
        half = length // 2
        if self.max_pfn > half * 8:
            raise InputError(f"{self.path}: bitmaps of {half} bytes each cannot describe "
                             f"{self.max_pfn} frames (max_mapnr)")
        words = -(-self.max_pfn // 64)
        raw = self._bytes(offset + half, words * 8, "the dumped-page bitmap")
        bits = np.frombuffer(raw, dtype="<u8").copy()
        if self.max_pfn % 64:  # bits past max_mapnr describe nothing
            bits[-1] &= np.uint64((1 << (self.max_pfn % 64)) - 1)
        self._dumped = bits
        counts = POPCOUNT8[bits.view(np.uint8)].reshape(-1, 8).sum(axis=1, dtype=np.int64)
        self._rank = np.concatenate(([0], np.cumsum(counts)))
        self.dumped_frames = int(self._rank[-1])
        self._desc_at = offset + length
        end = self._desc_at + self.dumped_frames * PAGE_DESC.size
        if end > self._file.size:
            raise InputError(f"{self.path}: {self.dumped_frames} page descriptors run to file offset {end:#x}, "
                             f"past the end of the file ({self._file.size:#x}): truncated")

    # -- PhysicalMemory -----------------------------------------------------

    @property
    def end(self) -> int:
        return self.max_pfn << PAGE_SHIFT

    def frames_present(self, pfns: np.ndarray) -> np.ndarray:
        pfns = np.asarray(pfns, dtype=np.uint64)
        inside = pfns < np.uint64(self.max_pfn)
        word = np.where(inside, pfns >> np.uint64(6), 0).astype(np.int64)
        bit = (self._dumped[word] >> (pfns & np.uint64(63))) & np.uint64(1)
        return inside & (bit == 1)

    def read_frames(self, pfns: np.ndarray) -> np.ndarray:
        pfns = np.asarray(pfns, dtype=np.uint64)
        present = self.frames_present(pfns)
        if not present.all():
            raise FrameOutsideMemory(int(pfns[~present][0]) << PAGE_SHIFT)
        out = np.empty((len(pfns), 512), dtype=ENTRY_DTYPE)
        for row, pfn in enumerate(pfns.tolist()):
            out[row] = self._frame(pfn)
        return out

    def _frame(self, pfn: int) -> np.ndarray:
        frame = self._cache.get(pfn)
        if frame is not None:
            self._cache.move_to_end(pfn)
            return frame
        frame = np.frombuffer(self._page(pfn), dtype=ENTRY_DTYPE)
        self._cache[pfn] = frame
        if len(self._cache) > self._cache_pages:
            self._cache.popitem(last=False)
        return frame

    def _page(self, pfn: int) -> bytes:
        """Frame pfn's 4096 bytes: its descriptor, then its data, decompressed."""
        word, bit = pfn >> 6, pfn & 63
        below = int(self._dumped[word]) & ((1 << bit) - 1)
        index = int(self._rank[word]) + below.bit_count()
        offset, size, flags, _ = PAGE_DESC.unpack(
            self._bytes(self._desc_at + index * PAGE_DESC.size, PAGE_DESC.size, f"page descriptor of pfn {pfn:#x}"))
        if size > 2 * PAGE_SIZE:
            raise InputError(f"{self.path}: page descriptor of pfn {pfn:#x} claims {size} bytes "
                             f"for a {PAGE_SIZE}-byte page")
        data = self._bytes(offset, size, f"the data of pfn {pfn:#x}")
        self.decompressed += 1
        page = _decompress(data, flags, pfn, self.path)
        if len(page) != PAGE_SIZE:
            raise InputError(f"{self.path}: pfn {pfn:#x} holds {len(page)} bytes after decompression, not {PAGE_SIZE}")
        return page

    # -- lifetime -----------------------------------------------------------

    def close(self) -> None:
        """Unmap the file; frames already read are copies and stay valid."""
        self._cache.clear()
        self._mmap.close()

    def __repr__(self) -> str:
        kind = "flattened " if self.flattened else ""
        return (f"KdumpCompressed({self.path!r}, {kind}version {self.header_version}, "
                f"{self.dumped_frames} of {self.max_pfn} frames dumped)")


def _vmcoreinfo_note(text: bytes) -> bytes:
    """The sub-header's bare VMCOREINFO text wrapped as the ELF note CoreNotes reads."""
    name = b"VMCOREINFO\0"
    pad = lambda b: b + b"\0" * (-len(b) % 4)
    return struct.pack("<III", len(name), len(text), 0) + pad(name) + pad(text)


def _decompress(data: bytes, flags: int, pfn: int, path: str) -> bytes:
    """One page as its descriptor's flags say it was stored; a page that does
    not decompress is an error naming the frame, never zeros."""
    try:
        if flags & DUMP_DH_COMPRESSED_ZLIB:
            return zlib.decompress(data)
        if flags & DUMP_DH_COMPRESSED_LZO:
            from lzallright import LZOCompressor
            return LZOCompressor.decompress(data, output_size_hint=PAGE_SIZE)
        if flags & DUMP_DH_COMPRESSED_SNAPPY:
            import cramjam
            return bytes(cramjam.snappy.decompress_raw(data))
        if flags & DUMP_DH_COMPRESSED_ZSTD:
            import cramjam
            return bytes(cramjam.zstd.decompress(data))
    except Exception as ex:  # each library raises its own error type
        kind = {1: "zlib", 2: "lzo", 4: "snappy", 0x20: "zstd"}.get(flags & 0x27, "compressed")
        raise InputError(f"{path}: the {kind} page of pfn {pfn:#x} does not decompress: {ex}") from None
    if flags & ~0x18:  # 0x8 incomplete-dump and 0x10 excluded-vmemmap are header flags
        raise InputError(f"{path}: page of pfn {pfn:#x} has unknown compression flags {flags:#x}")
    return data
