"""A printk ring written into simulated RAM the way Linux's writer fills it, for the reader's tests.

kernel/printk/printk_ringbuffer.c, single writer, no concurrency:

- the rings start as ``DEFINE_PRINTKRB()`` leaves them: head_id = tail_id =
  DESC0_ID (the last descriptor, reusable, with FAILED_LPOS), the data ring's
  head and tail lpos at BLK0_LPOS, one wrap behind 0;
- ``prb_reserve()``: desc_reserve() pushes the tail descriptor out when the
  new id would reuse its slot (desc_push_tail()); data_alloc() takes
  ``to_blk_size()`` bytes at the data head, a block that would cross the end
  of the ring moves to its beginning (get_next_lpos()), and data_push_tail()
  makes every descriptor whose block that overwrites reusable;
- the block is ``{id; text}``; a wrapping block writes its id at both places;
- the descriptor is finalized with its blk_lpos, and its printk_info holds
  seq, ts_nsec, text_len, facility, level and caller_id.

Kernel virtual addresses are mapped 4 KiB at a time through a 4- or 5-level
tree onto frames in a shuffled order, so a reader that assumed contiguous
physical memory would read garbage.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

import numpy as np

from ptilab.memory.simulated import SimulatedRAM
from ptilab.memory.vmcoreinfo import START_KERNEL_MAP
from ptilab.paging import Geometry

# Debian 6.1's layout, as its VMCOREINFO gives it (tests/realkernel/out/*/core.elf).
LAYOUT = {
    "SIZE(printk_ringbuffer)": 88, "OFFSET(printk_ringbuffer.desc_ring)": 0,
    "OFFSET(printk_ringbuffer.text_data_ring)": 48, "OFFSET(printk_ringbuffer.fail)": 80,
    "SIZE(prb_desc_ring)": 48, "OFFSET(prb_desc_ring.count_bits)": 0, "OFFSET(prb_desc_ring.descs)": 8,
    "OFFSET(prb_desc_ring.infos)": 16, "OFFSET(prb_desc_ring.head_id)": 24, "OFFSET(prb_desc_ring.tail_id)": 32,
    "SIZE(prb_desc)": 24, "OFFSET(prb_desc.state_var)": 0, "OFFSET(prb_desc.text_blk_lpos)": 8,
    "SIZE(prb_data_blk_lpos)": 16, "OFFSET(prb_data_blk_lpos.begin)": 0, "OFFSET(prb_data_blk_lpos.next)": 8,
    "SIZE(printk_info)": 88, "OFFSET(printk_info.seq)": 0, "OFFSET(printk_info.ts_nsec)": 8,
    "OFFSET(printk_info.text_len)": 16, "OFFSET(printk_info.caller_id)": 20, "OFFSET(printk_info.dev_info)": 24,
    "SIZE(prb_data_ring)": 32, "OFFSET(prb_data_ring.size_bits)": 0, "OFFSET(prb_data_ring.data)": 8,
    "OFFSET(prb_data_ring.head_lpos)": 16, "OFFSET(prb_data_ring.tail_lpos)": 24,
    "SIZE(atomic_long_t)": 8, "OFFSET(atomic_long_t.counter)": 0,
}
ID_MASK = (1 << 62) - 1
U64 = (1 << 64) - 1
FAILED_LPOS = 0x1
REUSABLE, FINALIZED = 3, 2
PGD_PA = 0x1000
RING_VA = START_KERNEL_MAP + 0x0100_0000  # where the ring and its arrays live (a kernel-image address)


@dataclass(frozen=True)
class Message:
    text: bytes
    ts_nsec: int = 0
    level: int = 6
    facility: int = 0
    caller_id: int = 1


@dataclass
class RingImage:
    """The RAM, its VMCOREINFO text, the addresses of the ring's parts, and what a reader should find."""

    ram: SimulatedRAM
    vmcoreinfo: str
    prb: int  # the ring struct's virtual address (SYMBOL(prb) points at a pointer to it)
    descs: int
    infos: int
    data: int
    count_bits: int
    size_bits: int
    survivors: list[tuple[int, Message]] = field(default_factory=list)  # (seq, message), oldest first
    ring_frames: set[int] = field(default_factory=set)
    head_id: int = 0
    tail_id: int = 0
    wraps: int = 0
    pa_of: dict[int, int] = field(default_factory=dict, repr=False)  # virtual page number: physical address

    def write(self, va: int, blob: bytes) -> None:
        """Bytes at a kernel virtual address of the ring, as the kernel would store them."""
        for at, run in _pages(va, blob):
            pa = self.pa_of[at >> 12] + (at & 0xFFF)
            frame = self.ram.read_frame(pa >> 12).copy()
            frame.view(np.uint8)[pa & 0xFFF:(pa & 0xFFF) + len(run)] = np.frombuffer(run, np.uint8)
            self.ram.write_entries(pa & ~0xFFF, frame)

    def poke(self, va: int, fmt: str, *values: int) -> None:
        self.write(va, struct.pack(fmt, *values))

    def desc(self, id_: int) -> int:
        """Virtual address of the descriptor of id_."""
        return self.descs + (id_ % (1 << self.count_bits)) * LAYOUT["SIZE(prb_desc)"]

    def info(self, id_: int) -> int:
        return self.infos + (id_ % (1 << self.count_bits)) * LAYOUT["SIZE(printk_info)"]


class _Tables:
    """A kernel tree mapping 4 KiB virtual pages onto chosen frames."""

    def __init__(self, ram: SimulatedRAM, geometry: Geometry, frames: list[int]):
        self.ram, self.g, self.free = ram, geometry, frames
        self.tables = {PGD_PA}

    def map(self, va: int, pa: int) -> None:
        table = PGD_PA
        for depth in range(self.g.levels - 1):
            slot = table + 8 * self.g.index(va, depth)
            entry = self.ram.read_entry(slot)
            if not entry & 1:
                entry = (self.free.pop() << 12) | 0x63
                self.ram.write_entry(slot, entry)
            table = entry & 0x000F_FFFF_FFFF_F000
        self.ram.write_entry(table + 8 * self.g.index(va, self.g.levels - 1), pa | 0x8000_0000_0000_0063)


def build_ring(messages: list[Message], count_bits: int = 4, size_bits: int = 9, levels: int = 4,
               seed: int = 0) -> RingImage:
    """RAM holding a printk ring that the messages were printed into, oldest first."""
    g = Geometry(levels)
    ram = SimulatedRAM(64 << 20)
    rng = random.Random(seed)
    frames = list(range(0x100, 0x4000))
    rng.shuffle(frames)
    tables = _Tables(ram, g, frames)
    count, size = 1 << count_bits, 1 << size_bits
    prb_ptr = RING_VA
    prb = RING_VA + 0x40
    descs = RING_VA + 0x1000
    infos = descs + _page_up(count * LAYOUT["SIZE(prb_desc)"])
    data = infos + _page_up(count * LAYOUT["SIZE(printk_info)"]) + 0x123 * 8  # not page-aligned
    end = data + size
    pa_of = {}
    for page in range(RING_VA >> 12, (end + 0xFFF) >> 12):
        pa_of[page] = frames.pop() << 12
        tables.map(page << 12, pa_of[page])
    ring = RingImage(ram, "", prb, descs, infos, data, count_bits, size_bits, pa_of=pa_of)
    ring.ring_frames = {pa_of[p] >> 12 for p in range(prb >> 12, (end + 0xFFF) >> 12)}
    write = ring.write
    writer = _Writer(count, size)
    for seq, m in enumerate(messages):
        writer.printk(seq, m)
    desc_bytes, info_bytes, data_bytes = writer.arrays()
    write(prb_ptr, struct.pack("<Q", prb))
    write(prb, writer.header(descs, infos, data, count_bits, size_bits))
    write(descs, desc_bytes)
    write(infos, info_bytes)
    write(data, data_bytes)
    ring.survivors = writer.survivors()
    ring.head_id, ring.tail_id, ring.wraps = writer.head_id, writer.tail_id, writer.wraps
    ring.vmcoreinfo = vmcoreinfo_text(prb_ptr, levels)
    return ring


def vmcoreinfo_text(prb_symbol: int, levels: int = 4, **changes) -> str:
    """VMCOREINFO for the built image, with entries changed (value) or dropped (None)."""
    entries = {"OSRELEASE": "6.1.0-test", "PAGESIZE": "4096", "SYMBOL(init_top_pgt)": f"{START_KERNEL_MAP + PGD_PA:x}",
               "SYMBOL(prb)": f"{prb_symbol:x}", **{k: str(v) for k, v in LAYOUT.items()},
               "NUMBER(phys_base)": "0", "NUMBER(pgtable_l5_enabled)": str(int(levels == 5)), "KERNELOFFSET": "0"}
    for key, value in changes.items():
        key = key.replace("__", ".")
        key = next((k for k in entries if k.endswith(f"({key})") or k == key), key)
        if value is None:
            entries.pop(key, None)
        else:
            entries[key] = str(value)
    return "".join(f"{k}={v}\n" for k, v in entries.items())


def _page_up(n: int) -> int:
    return -(-n // 4096) * 4096


def _pages(va: int, blob: bytes):
    """(va, bytes) runs of blob that do not cross a page."""
    at = 0
    while at < len(blob):
        n = min(len(blob) - at, 4096 - ((va + at) & 0xFFF))
        yield va + at, blob[at:at + n]
        at += n


class _Writer:
    """printk_ringbuffer.c's writer, one CPU, every record finalized at once."""

    def __init__(self, count: int, size: int):
        self.count, self.size = count, size
        self.descs = [[0, FAILED_LPOS, FAILED_LPOS] for _ in range(count)]  # state_var, begin, next
        self.infos = [None] * count
        self.data = bytearray(size)
        # DESC0_ID: -(count + 1), so that the first id is -count and uses slot 0;
        # the bootstrap descriptor in the last slot is reusable (Req1).
        self.head_id = self.tail_id = (-(count + 1)) & ID_MASK
        self.descs[count - 1][0] = (REUSABLE << 62) | self.head_id
        self.head_lpos = self.tail_lpos = (-size) & U64  # BLK0_LPOS
        self.wraps = 0  # blocks written at the ring's beginning because they would have crossed its end

    def printk(self, seq: int, m: Message) -> None:
        text = m.text[:0xFFFF]
        blk = -(-(len(text) + 8) // 8) * 8  # to_blk_size()
        if blk > self.size // 2:  # data_check_size(): a block may fill at most half the ring
            return
        id_ = (self.head_id + 1) & ID_MASK
        if (id_ - self.count) & ID_MASK == self.tail_id:  # DESC_ID_PREV_WRAP: the slot is the tail's
            self._push_desc_tail()
        begin = self.head_lpos
        next_ = self._next_lpos(begin, blk)
        self._push_data_tail((next_ - self.size) & U64)
        self.head_lpos = next_
        self.head_id = id_
        slot = id_ % self.count
        wraps = (begin // self.size) != (next_ // self.size)
        at = 0 if wraps else begin % self.size
        block = struct.pack("<Q", id_) + text
        self.data[at:at + len(block)] = block
        self.wraps += wraps
        if wraps:  # "Store the ID on the wrapped block for consistency."
            self.data[begin % self.size:begin % self.size + 8] = struct.pack("<Q", id_)
        self.descs[slot] = [(FINALIZED << 62) | id_, begin, next_]
        self.infos[slot] = (seq, m)

    def _next_lpos(self, lpos: int, blk: int) -> int:
        """get_next_lpos(): a block that would cross a wrap starts at the next wrap's beginning."""
        nxt = (lpos + blk) & U64
        if lpos // self.size == nxt // self.size:
            return nxt
        return ((nxt // self.size) * self.size + blk) & U64

    def _push_data_tail(self, lpos: int) -> None:
        """data_push_tail(): every block before lpos is given up and its descriptor made reusable."""
        while _before(self.tail_lpos, lpos):
            slot = next(i for i, d in enumerate(self.descs)
                        if d[1] == self.tail_lpos and d[0] >> 62 != REUSABLE and self.infos[i] is not None)
            self.descs[slot][0] = (REUSABLE << 62) | (self.descs[slot][0] & ID_MASK)
            self.tail_lpos = self.descs[slot][2]

    def _push_desc_tail(self) -> None:
        """desc_push_tail(): the tail descriptor's data goes (if it still has any), the tail moves on."""
        slot = self.tail_id % self.count
        d = self.descs[slot]
        if d[0] >> 62 != REUSABLE:
            self._push_data_tail(d[2])
        self.descs[slot][0] = (REUSABLE << 62) | self.tail_id
        self.tail_id = (self.tail_id + 1) & ID_MASK

    def arrays(self) -> tuple[bytes, bytes, bytes]:
        descs = b"".join(struct.pack("<QQQ", *d) for d in self.descs)
        infos = bytearray()
        for info in self.infos:
            rec = bytearray(88)
            if info is not None:
                seq, m = info
                struct.pack_into("<QQHBBI", rec, 0, seq, m.ts_nsec, min(len(m.text), 0xFFFF), m.facility,
                                 (m.level << 5) | 0x2, m.caller_id)  # flags: LOG_NEWLINE
            infos += rec
        return descs, bytes(infos), bytes(self.data)

    def header(self, descs: int, infos: int, data: int, count_bits: int, size_bits: int) -> bytes:
        rb = bytearray(88)
        struct.pack_into("<IxxxxQQQQ", rb, 0, count_bits, descs, infos, self.head_id, self.tail_id)
        struct.pack_into("<IxxxxQQQ", rb, 48, size_bits, data, self.head_lpos, self.tail_lpos)
        return bytes(rb)

    def survivors(self) -> list[tuple[int, Message]]:
        """The records a reader must find: finalized descriptors from tail to head, oldest first."""
        out = []
        n = ((self.head_id - self.tail_id) & ID_MASK) + 1
        for k in range(n):
            id_ = (self.tail_id + k) & ID_MASK
            d = self.descs[id_ % self.count]
            if d[0] == (FINALIZED << 62) | id_:
                out.append(self.infos[id_ % self.count])
        return out


def _before(a: int, b: int) -> bool:
    """lpos a lies before b, in the ring's modular arithmetic (b - a, as unsigned, below 2^63)."""
    return 0 < (b - a) & U64 < 1 << 63
