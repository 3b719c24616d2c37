"""The kernel's log out of a dump: Linux's lockless printk ring (5.10 and later), from VMCOREINFO alone.

Since 5.10 printk keeps its messages in ``struct printk_ringbuffer``
(kernel/printk/printk_ringbuffer.[ch]): a *descriptor ring* of ``2^count_bits``
``struct prb_desc`` (a ``state_var`` and the ``text_blk_lpos`` of the text)
with a parallel array of ``struct printk_info`` (seq, ts_nsec, text_len,
facility, level, caller_id, dev_info), and a *text data ring* of
``2^size_bits`` bytes holding blocks ``{unsigned long id; char text[];}``.
``log_buf_vmcoreinfo_setup()`` (kernel/printk/printk.c) puts the symbol
``prb`` (a pointer to the ring in use: ``printk_rb_static``, or
``printk_rb_dynamic`` once ``log_buf_len=`` grew it into memblock memory) and
every offset a reader needs in VMCOREINFO, so no debug info is needed. This
module reads it the way makedumpfile's ``dump_lockless_dmesg()`` (printk.c)
does:

- descriptor ids from ``tail_id`` to ``head_id`` inclusive; a descriptor
  counts only when its ``state_var`` carries that id and the state (its top
  two bits) is committed or finalized (``get_desc_state()``);
- a data block whose ``begin`` lies one wrap behind its ``next`` starts at
  the ring's beginning (``get_next_lpos()`` never splits a block); the text
  follows the block's id and is ``printk_info.text_len`` bytes, cut to the
  block (a truncated record);
- data-less blocks (``FAILED_LPOS``, and ``EMPTY_LINE_LPOS``: both lpos odd)
  hold no text and are skipped, as makedumpfile skips them.

``level`` and ``facility`` have no VMCOREINFO entry: they are the two bytes
after ``text_len`` (``u8 facility; u8 flags:5; u8 level:3;``, the layout of
``struct printk_info`` since 5.10), read as drgn and crash read them.
``dev_info`` (SUBSYSTEM=/DEVICE=) is not read: makedumpfile and dmesg's plain
output do not print it.

Bad rings (a count_bits past what printk can allocate, ids from tail to head
spanning more than the ring, pointers to unmapped memory) raise InputError;
a single descriptor that is not committed, or whose block is not one the
kernel could have written, is skipped (the writer may have been mid-way
when the dump was taken), and a ring left with no record at all is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ptilab.errors import FrameOutsideMemory, InputError
from ptilab.memory.vmcoreinfo import VmcoreInfo
from ptilab.paging.cr3 import CR3
from ptilab.paging.entry import PAGE_SHIFT, PAGE_SIZE
from ptilab.paging.geometry import Geometry
from ptilab.paging.translate import PageFault, translate

if TYPE_CHECKING:
    from ptilab.memory.physical import PhysicalMemory

# kernel/printk/printk_ringbuffer.h: state_var's top two bits are the state, the rest the id.
DESC_SV_BITS = 64
DESC_FLAGS_SHIFT = DESC_SV_BITS - 2
DESC_ID_MASK = (1 << DESC_FLAGS_SHIFT) - 1
DESC_COMMITTED, DESC_FINALIZED = 1, 2
ID_SIZE = 8  # sizeof(db->id): every block starts with its descriptor's id and is aligned to it
# kernel/printk/printk.c: LOG_BUF_LEN_MAX is 2 GiB, so no data ring is larger, and each
# descriptor stands for at least one block of 8 bytes or more.
MAX_SIZE_BITS = 31
MAX_COUNT_BITS = MAX_SIZE_BITS - 3
CALLER_CPU = 0x80000000  # printk_caller_id(): a CPU (not in task context) sets bit 31
U64 = (1 << 64) - 1

# The VMCOREINFO entries the ring is read with (log_buf_vmcoreinfo_setup()).
NEEDED = ("OFFSET(printk_ringbuffer.desc_ring)", "OFFSET(printk_ringbuffer.text_data_ring)",
          "OFFSET(prb_desc_ring.count_bits)", "OFFSET(prb_desc_ring.descs)", "OFFSET(prb_desc_ring.infos)",
          "OFFSET(prb_desc_ring.head_id)", "OFFSET(prb_desc_ring.tail_id)",
          "SIZE(prb_desc)", "OFFSET(prb_desc.state_var)", "OFFSET(prb_desc.text_blk_lpos)",
          "OFFSET(prb_data_blk_lpos.begin)", "OFFSET(prb_data_blk_lpos.next)",
          "SIZE(printk_info)", "OFFSET(printk_info.seq)", "OFFSET(printk_info.ts_nsec)",
          "OFFSET(printk_info.text_len)", "OFFSET(printk_info.caller_id)",
          "OFFSET(prb_data_ring.size_bits)", "OFFSET(prb_data_ring.data)")


@dataclass(frozen=True)
class LogRecord:
    """One message of the kernel's log.

    seq: printk's sequence number (dmesg -r's, /dev/kmsg's second field).
    ts_nsec: local_clock() at the printk, in nanoseconds since boot.
    level: the syslog level 0 (KERN_EMERG) to 7 (KERN_DEBUG).
    facility: the syslog facility (0 for the kernel's own, 1 for /dev/kmsg writers).
    caller_id: who printed it, as printk's caller field shows it: "T123" (task pid 123) or "C1" (CPU 1).
    text: the message, UTF-8, undecodable bytes as \\xNN; lines of a multi-line message split by "\\n".
    raw: the message's bytes as the ring holds them (what makedumpfile prints).
    """

    seq: int
    ts_nsec: int
    level: int
    facility: int
    caller_id: str
    text: str
    raw: bytes = field(repr=False)

    @property
    def timestamp(self) -> str:
        """dmesg's ``[    0.123456]``: seconds, and microseconds of the nanosecond clock."""
        return f"[{self.ts_nsec // 1_000_000_000:5d}.{self.ts_nsec % 1_000_000_000 // 1000:06d}]"

    def as_dict(self) -> dict:
        return {"seq": self.seq, "time": f"{self.ts_nsec // 1_000_000_000}.{self.ts_nsec % 1_000_000_000 // 1000:06d}",
                "ts_nsec": self.ts_nsec, "level": self.level, "facility": self.facility,
                "caller": self.caller_id, "text": self.text}


@dataclass(frozen=True)
class KernelLog:
    """The ring as read: its records oldest first, and what was passed over.

    skipped: descriptors from tail to head that were not committed or finalized,
        or whose block the kernel could not have written (data-less ones included).
    frames: the physical frames the ring's three arrays and its header span, sorted.
    """

    records: tuple[LogRecord, ...]
    skipped: int
    frames: tuple[int, ...] = field(repr=False)


def image_vmcoreinfo(mem: PhysicalMemory, name: str) -> VmcoreInfo:
    """The VMCOREINFO an image carries, parsed; InputError naming the image when it has none.

    The one place the log reads it from an image, so the declared attribute
    that replaces the probe has one place to go."""
    info = mem.vmcoreinfo
    if info is None:
        raise InputError(f"{name} carries no VMCOREINFO (no note, and none found in its memory), so the "
                         f"kernel's log cannot be found in it")
    return info


def read_kernel_log(mem: PhysicalMemory, info: VmcoreInfo) -> list[LogRecord]:
    """The kernel's log, oldest record first, read from the printk ring VMCOREINFO describes."""
    return list(read_ring(mem, info).records)


def read_ring(mem: PhysicalMemory, info: VmcoreInfo) -> KernelLog:
    """The printk ring with what was skipped and the frames it spans (see the module docstring)."""
    layout = _layout(info)
    space = _KernelSpace(mem, info)
    prb = space.u64(layout["prb_symbol"])
    header = space.read(prb, max(_header_end(layout), 8))
    dr, tr = layout["printk_ringbuffer.desc_ring"], layout["printk_ringbuffer.text_data_ring"]
    count_bits = _u32(header, dr + layout["prb_desc_ring.count_bits"])
    size_bits = _u32(header, tr + layout["prb_data_ring.size_bits"])
    if not 0 <= count_bits <= MAX_COUNT_BITS:
        raise InputError(f"the printk ring at {prb:#x} has count_bits {count_bits}: printk never allocates more "
                         f"than 2^{MAX_COUNT_BITS} descriptors")
    if not 3 <= size_bits <= MAX_SIZE_BITS:
        raise InputError(f"the printk ring at {prb:#x} has a text data ring of 2^{size_bits} bytes: printk's "
                         f"is 2^3 to 2^{MAX_SIZE_BITS} (LOG_BUF_LEN_MAX)")
    count, size = 1 << count_bits, 1 << size_bits
    head = _u64(header, dr + layout["prb_desc_ring.head_id"]) & DESC_ID_MASK
    tail = _u64(header, dr + layout["prb_desc_ring.tail_id"]) & DESC_ID_MASK
    span = ((head - tail) & DESC_ID_MASK) + 1
    if span > count:
        raise InputError(f"the printk ring's tail id {tail:#x} and head id {head:#x} are {span} descriptors "
                         f"apart, more than the ring's {count}")
    descs = space.read(_u64(header, dr + layout["prb_desc_ring.descs"]), count * layout["prb_desc"], "descs")
    infos = space.read(_u64(header, dr + layout["prb_desc_ring.infos"]), count * layout["printk_info"], "infos")
    data = space.read(_u64(header, tr + layout["prb_data_ring.data"]), size, "text data")
    ids = (tail + np.arange(span, dtype=np.uint64)) & np.uint64(DESC_ID_MASK)
    records = _records(layout, ids, np.frombuffer(descs, np.uint8).reshape(count, -1),
                       np.frombuffer(infos, np.uint8).reshape(count, -1), data)
    if not records:
        raise InputError(f"the printk ring at {prb:#x} holds no committed record in its {span} descriptors "
                         f"from id {tail:#x} to {head:#x}")
    return KernelLog(tuple(records), span - len(records), tuple(sorted(space.frames)))


def _layout(info: VmcoreInfo) -> dict[str, int]:
    """The offsets and sizes, by "struct.member" and "struct", VMCOREINFO gives for the ring."""
    if "prb" not in info.symbols:
        if "log_buf" in info.symbols:
            raise InputError("this kernel keeps its log in log_buf (Linux before 5.10): ptilab reads only the "
                             "lockless printk ring of 5.10 and later (VMCOREINFO's SYMBOL(prb))")
        raise InputError("VMCOREINFO names no printk ring (SYMBOL(prb)): a kernel built without CONFIG_PRINTK?")
    missing = [key for key in NEEDED if key not in info.entries]
    if missing:
        raise InputError(f"VMCOREINFO lacks {', '.join(missing[:3])}{' and more' if len(missing) > 3 else ''}: "
                         f"the printk ring cannot be read without them")
    layout = {"prb_symbol": info.symbols["prb"]}
    # atomic_long_t.counter is 0 on every arch; VMCOREINFO says so since 5.10.
    for key in (*NEEDED, "OFFSET(atomic_long_t.counter)"):
        if key not in info.entries:
            layout[key[key.index("(") + 1:-1]] = 0
            continue
        try:
            value = int(info.entries[key], 10)
        except ValueError:
            raise InputError(f"VMCOREINFO {key}={info.entries[key][:40]!r} is not a decimal number") from None
        if not 0 <= value < 1 << 16:
            raise InputError(f"VMCOREINFO {key}={value}: no printk structure is that large")
        layout[key[key.index("(") + 1:-1]] = value
    _check_fits(layout)
    return layout


def _check_fits(layout: dict[str, int]) -> None:
    """Each member inside its structure: a layout that says otherwise is not printk's."""
    fits = (("prb_desc", "prb_desc.state_var", layout["atomic_long_t.counter"] + 8),
            ("prb_desc", "prb_desc.text_blk_lpos", max(layout["prb_data_blk_lpos.begin"],
                                                       layout["prb_data_blk_lpos.next"]) + 8),
            ("printk_info", "printk_info.seq", 8), ("printk_info", "printk_info.ts_nsec", 8),
            ("printk_info", "printk_info.text_len", 4), ("printk_info", "printk_info.caller_id", 4))
    for struct, member, width in fits:
        if layout[member] + width > layout[struct]:
            raise InputError(f"VMCOREINFO puts {member} at {layout[member]}, past SIZE({struct})={layout[struct]}")


def _header_end(layout: dict[str, int]) -> int:
    """Bytes of struct printk_ringbuffer the reader needs (SIZE() of it is not always given)."""
    dr, tr = layout["printk_ringbuffer.desc_ring"], layout["printk_ringbuffer.text_data_ring"]
    counter = layout["atomic_long_t.counter"]
    return max(dr + layout["prb_desc_ring.count_bits"] + 4, dr + layout["prb_desc_ring.descs"] + 8,
               dr + layout["prb_desc_ring.infos"] + 8, dr + layout["prb_desc_ring.head_id"] + counter + 8,
               dr + layout["prb_desc_ring.tail_id"] + counter + 8, tr + layout["prb_data_ring.size_bits"] + 4,
               tr + layout["prb_data_ring.data"] + 8)


def _records(layout: dict[str, int], ids: np.ndarray, descs: np.ndarray, infos: np.ndarray,
             data: bytes) -> list[LogRecord]:
    """The committed records among descriptors ids, decoded (vectorised over descriptors)."""
    count, size = len(descs), len(data)
    slot = (ids % np.uint64(count)).astype(np.int64)
    d, i = descs[slot], infos[slot]
    state_var = _field(d, layout["prb_desc.state_var"] + layout["atomic_long_t.counter"], "<u8")
    lpos = layout["prb_desc.text_blk_lpos"]
    begin = _field(d, lpos + layout["prb_data_blk_lpos.begin"], "<u8")
    next_ = _field(d, lpos + layout["prb_data_blk_lpos.next"], "<u8")
    state = state_var >> np.uint64(DESC_FLAGS_SHIFT)
    keep = ((state_var & np.uint64(DESC_ID_MASK)) == ids) & ((state == DESC_COMMITTED) | (state == DESC_FINALIZED))
    start, length, valid = _blocks(begin, next_, size)
    keep &= valid
    text_len = _field(i, layout["printk_info.text_len"], "<u2").astype(np.int64)
    length = np.minimum(length, text_len)  # a truncated record: its text was cut to the block
    seq = _field(i, layout["printk_info.seq"], "<u8")
    ts = _field(i, layout["printk_info.ts_nsec"], "<u8")
    # u8 facility; u8 flags:5, level:3 (bit-fields fill a byte from its low bit on x86 and arm64).
    facility = i[:, layout["printk_info.text_len"] + 2]
    level = i[:, layout["printk_info.text_len"] + 3] >> 5
    caller = _field(i, layout["printk_info.caller_id"], "<u4")
    out = []
    for n in np.flatnonzero(keep).tolist():
        raw = data[int(start[n]):int(start[n]) + int(length[n])]
        out.append(LogRecord(int(seq[n]), int(ts[n]), int(level[n]), int(facility[n]), caller_name(int(caller[n])),
                             raw.decode("utf-8", "backslashreplace"), raw))
    return out


def _blocks(begin: np.ndarray, next_: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each block's text starts in the data ring, its length, and whether the
    block is one the kernel writes (printk_ringbuffer.c, get_data())."""
    shift = np.uint64(size.bit_length() - 1)
    mask = np.uint64(size - 1)
    dataless = ((begin & np.uint64(1)) != 0) & ((next_ & np.uint64(1)) != 0)
    same_wrap = ((begin >> shift) == (next_ >> shift)) & (begin < next_)
    # A wrapping block: begin is one wrap behind next, and the block lies at the ring's start.
    wrapping = ~same_wrap & (((begin + np.uint64(size)) >> shift) == (next_ >> shift))
    start = np.where(same_wrap, begin & mask, np.uint64(0))
    end = np.where(same_wrap, (begin & mask) + (next_ - begin), next_ & mask)
    aligned = ((begin | next_) & np.uint64(ID_SIZE - 1)) == 0
    valid = ~dataless & (same_wrap | wrapping) & aligned & (end >= start + np.uint64(ID_SIZE))
    valid &= end <= np.uint64(size)
    start = np.where(valid, start + np.uint64(ID_SIZE), 0).astype(np.int64)
    length = np.where(valid, end.astype(np.int64) - start, 0)
    return start, length, valid


def caller_name(caller_id: int) -> str:
    """printk's caller field: "T<pid>" in task context, "C<cpu>" otherwise (printk_caller_id())."""
    return f"C{caller_id & ~CALLER_CPU}" if caller_id & CALLER_CPU else f"T{caller_id}"


def _field(rows: np.ndarray, offset: int, dtype: str) -> np.ndarray:
    width = np.dtype(dtype).itemsize
    return np.ascontiguousarray(rows[:, offset:offset + width]).view(dtype)[:, 0]


def _u32(buf: bytes, at: int) -> int:
    return int.from_bytes(buf[at:at + 4], "little")


def _u64(buf: bytes, at: int) -> int:
    return int.from_bytes(buf[at:at + 8], "little")


class _KernelSpace:
    """Kernel virtual memory through init_top_pgt's tables, recording the frames read."""

    def __init__(self, mem: PhysicalMemory, info: VmcoreInfo):
        self.mem = mem
        self.cr3 = CR3(info.kernel_pgd)
        self.geometry = Geometry(info.levels)
        self.frames: set[int] = set()

    def read(self, va: int, length: int, what: str = "header") -> bytes:
        """length bytes at kernel virtual address va, page by page through the tables."""
        if length == 0:
            return b""
        if length > self.mem.end:
            raise InputError(f"the printk ring's {what} at {va:#x} would be {length} bytes, more than the "
                             f"image's {self.mem.end} bytes of memory")
        if not self.geometry.is_canonical(va) or not self.geometry.is_canonical((va + length - 1) & U64):
            raise InputError(f"the printk ring's {what} at {va:#x} ({length} bytes) is not a kernel address")
        first, last = va >> PAGE_SHIFT, (va + length - 1) >> PAGE_SHIFT
        pfns = np.empty(last - first + 1, np.uint64)
        page = first
        while page <= last:
            run = self._translate(page << PAGE_SHIFT, what)
            # A large page maps the pages after this one too: no walk for each.
            n = min(last - page + 1, run[1])
            pfns[page - first:page - first + n] = np.arange(run[0], run[0] + n, dtype=np.uint64)
            page += n
        if not self.mem.frames_present(pfns).all():
            missing = int(pfns[~self.mem.frames_present(pfns)][0])
            raise InputError(f"the printk ring's {what} at {va:#x} lies in frame {missing:#x}, which the image "
                             f"does not hold")
        self.frames.update(pfns.tolist())
        body = self.mem.read_frames(pfns).tobytes()
        offset = va & (PAGE_SIZE - 1)
        return body[offset:offset + length]

    def u64(self, va: int) -> int:
        return _u64(self.read(va, 8, "pointer prb"), 0)

    def _translate(self, va: int, what: str) -> tuple[int, int]:
        """(first frame, pages to the end of the page that maps va)."""
        try:
            t = translate(self.mem, self.cr3, self.geometry.canonical(va), self.geometry)
        except PageFault as fault:
            raise InputError(f"the printk ring's {what} at {va:#x} is not mapped by init_top_pgt ({fault})") from None
        except FrameOutsideMemory as missing:
            raise InputError(f"the printk ring's {what} at {va:#x}: a page table lies outside the image "
                             f"({missing})") from None
        pages_left = (t.page_size - (va & (t.page_size - 1))) >> PAGE_SHIFT
        return t.pa >> PAGE_SHIFT, pages_left


# -- dmesg's text ------------------------------------------------------------------

def format_record(record: LogRecord, prefix_each_line: bool = False) -> str:
    """One record as makedumpfile --dump-dmesg prints it: ``[    0.123456] text``, the
    lines after a newline in the text indented under the first, bytes that are
    neither printable nor space as ``\\xNN`` (printk.c, dump_record()).

    prefix_each_line: each line after the first gets the timestamp again instead,
    as the kernel's console and syslog (busybox dmesg) print them (record_print_text())."""
    head = record.timestamp + " "
    lines = _printable(record.raw).split("\n")
    rest = head if prefix_each_line else " " * len(head)
    return head + ("\n" + rest).join(lines)


def format_dmesg(records: list[LogRecord] | tuple[LogRecord, ...], prefix_each_line: bool = False) -> str:
    """The records as makedumpfile --dump-dmesg writes them: a line each, ending in a newline."""
    return "".join(format_record(r, prefix_each_line) + "\n" for r in records)


# C's isprint() or isspace() in the "C" locale, the bytes dump_record() prints as they are.
_KEPT = frozenset(range(0x20, 0x7F)) | frozenset(b"\t\n\v\f\r")


def _printable(raw: bytes) -> str:
    if all(b in _KEPT for b in raw):
        return raw.decode("ascii")
    return "".join(chr(b) if b in _KEPT else f"\\x{b:02x}" for b in raw)
