"""The kernel's VMCOREINFO note: where a crash dump's reader learns the kernel's layout.

Linux writes it at boot (kernel/crash_core.c, crash_save_vmcoreinfo_init(),
and on x86-64 arch/x86/kernel/machine_kexec_64.c, arch_crash_save_vmcoreinfo())
as ``KEY=VALUE`` lines; kdump's ELF vmcore, makedumpfile's diskdump header,
/proc/kcore and QEMU's dumps (with ``-device vmcoreinfo`` and the guest's
qemu_fw_cfg driver) all carry it. The lines that matter here::

    OSRELEASE=6.1.0-57-amd64
    SYMBOL(init_top_pgt)=ffffffff89410000   VMCOREINFO_SYMBOL: "%lx" of &sym, the running (slid) address
    NUMBER(phys_base)=-25165824             VMCOREINFO_NUMBER: "%ld", so an unsigned long can print negative
    NUMBER(pgtable_l5_enabled)=0            "%d" of pgtable_l5_enabled()
    KERNELOFFSET=6a00000                    "%lx" of kaslr_offset(): the KASLR slide

The kernel also keeps the text in its own RAM, which is how a dump without
the note (LiME, a raw image, QEMU without ``-device vmcoreinfo``) still
yields it: crash_save_vmcoreinfo_init() (kernel/crash_core.c, since 6.9
kernel/vmcore_info.c) writes it from offset 0 of a zeroed page,
``vmcoreinfo_data``, ``OSRELEASE=`` first, and copies it into
``vmcoreinfo_note`` (alloc_pages_exact(VMCOREINFO_NOTE_SIZE): a 12-byte
Elf64_Nhdr, ``"VMCOREINFO\0"`` padded to 12, the text at byte 24, then an
empty note). That note is what QEMU's vmcoreinfo device and kdump read.
Only a crash appends to it (``CRASHTIME=``, crash_save_vmcoreinfo(), to
the data and then the note), so in a live dump both copies hold the boot's
text. find_vmcoreinfo() looks for both and believes one only when the
image's page tables confirm it.

``init_top_pgt`` is ``swapper_pg_dir``, the kernel PGD of init_mm; under PTI
its user twin sits 4 KiB above it (an order-1 pair, as every mm's). A
kernel-image address becomes physical as ``__pa_symbol()`` computes it::

    >>> info = parse_vmcoreinfo(core.vmcoreinfo_text)
    >>> hex(info.kernel_pgd), info.levels, hex(info.kernel_offset)
    ('0x7c10000', 4, '0x6a00000')
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import numpy as np

from ptilab.errors import FrameOutsideMemory, InputError
from ptilab.paging import CR3, Geometry, PageFault, translate
from ptilab.paging import entry as e

if TYPE_CHECKING:
    from ptilab.memory.physical import PhysicalMemory

# __START_KERNEL_map (arch/x86/include/asm/page_64_types.h): where the kernel
# image is mapped before the KASLR slide; __pa_symbol(x) = x - it + phys_base.
START_KERNEL_MAP = 0xFFFFFFFF80000000
PTI_USER_PGD_OFFSET = 0x1000  # PTI_USER_PGTABLE_BIT is bit 12 of the PGD's address
U64 = (1 << 64) - 1
# KERNEL_IMAGE_SIZE (arch/x86/include/asm/page_64_types.h): the kernel image,
# slid or not, lies in the first 1 GiB above __START_KERNEL_map; the slide is
# a multiple of CONFIG_PHYSICAL_ALIGN, which x86-64 requires to be of 2 MiB.
KERNEL_IMAGE_SIZE = 1 << 30
KASLR_ALIGN = 1 << 21
VMCOREINFO_BYTES = 4096  # VMCOREINFO_BYTES: PAGE_SIZE, the data page the text fills at most
# The text's first 8 bytes as a little-endian word, and where each copy keeps it.
OSRELEASE_WORD = np.uint64(int.from_bytes(b"OSRELEAS", "little"))
NOTE_NAME_TAIL = np.uint64(int.from_bytes(b"REINFO\0\0", "little"))  # word 2 of vmcoreinfo_note
NOTE_NAMESZ = 11  # strlen("VMCOREINFO") + 1, the low half of the note's first word
NOTE_TEXT_AT = 24  # Elf64_Nhdr (12) + VMCOREINFO_NOTE_NAME_BYTES (12)
MAX_CANDIDATES = 1 << 12  # distinct texts judged before the search gives up: bounds a hostile image


@dataclass(frozen=True)
class VmcoreInfo:
    """The VMCOREINFO entries ptilab uses, decoded, and all the others as given.

    osrelease: ``OSRELEASE`` (the kernel's ``uname -r``), or None.
    kernel_offset: ``KERNELOFFSET``, the KASLR slide of the kernel image (0 without KASLR).
    phys_base: ``NUMBER(phys_base)`` as the unsigned 64-bit value the kernel holds;
        None when the text has none (pa_symbol() then refuses).
    pgtable_l5_enabled: ``NUMBER(pgtable_l5_enabled)``: 5-level paging was on.
    symbols: every ``SYMBOL(name)``: its running virtual address.
    numbers: every ``NUMBER(name)``, as a signed integer.
    entries: every line, ``KEY`` to ``VALUE`` text.
    found_at: None when the text came from the dump's note; else the physical
        address where find_vmcoreinfo() found it in the image's memory.
    """

    osrelease: str | None
    kernel_offset: int
    phys_base: int | None
    pgtable_l5_enabled: bool
    symbols: dict[str, int] = field(repr=False)
    numbers: dict[str, int] = field(repr=False)
    entries: dict[str, str] = field(repr=False)
    found_at: int | None = None

    @property
    def source(self) -> str:
        """Where the text came from, for messages: the note, or a physical address."""
        if self.found_at is None:
            return "the dump's VMCOREINFO note"
        return f"found in memory at pa {self.found_at:#x}"

    @property
    def levels(self) -> int:
        """Paging levels the kernel ran with: 5 when LA57 was enabled, else 4."""
        return 5 if self.pgtable_l5_enabled else 4

    def pa_symbol(self, va: int) -> int:
        """Physical address of a kernel-image virtual address, as ``__pa_symbol()``."""
        if self.phys_base is None:
            raise InputError("VMCOREINFO has no NUMBER(phys_base): kernel-image addresses cannot be made physical")
        return (va - START_KERNEL_MAP + self.phys_base) & U64

    @property
    def kernel_pgd(self) -> int:
        """Physical address of ``init_top_pgt`` (``swapper_pg_dir``): init_mm's kernel PGD."""
        va = self.symbols.get("init_top_pgt", self.symbols.get("swapper_pg_dir"))
        if va is None:
            raise InputError("VMCOREINFO names neither init_top_pgt nor swapper_pg_dir: no page tables to start from")
        return self.pa_symbol(va)


def pgd_pair(info: VmcoreInfo) -> tuple[int, int]:
    """init_mm's PGD pair ``(kernel, user)``: physical addresses, the user PGD
    4 KiB above (only a table under PTI; without PTI the page is zero)."""
    kernel = info.kernel_pgd
    return kernel, kernel + PTI_USER_PGD_OFFSET


def parse_vmcoreinfo(text: str | bytes) -> VmcoreInfo:
    """Decode a VMCOREINFO note's text (the note's descriptor, NULs allowed at the end).

    Raises InputError when a value ptilab decodes is malformed. A text
    without ``NUMBER(phys_base)`` still decodes (its paging mode is still
    evidence); only VmcoreInfo.pa_symbol() refuses it.
    """
    if isinstance(text, bytes):
        text = text.rstrip(b"\0").decode("ascii", "replace")
    entries: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            entries[key.strip()] = value.strip()
    symbols = {key[7:-1]: _hex(key, v) for key, v in entries.items() if key.startswith("SYMBOL(") and key.endswith(")")}
    numbers = {key[7:-1]: _number(key, v) for key, v in entries.items() if key.startswith("NUMBER(") and key.endswith(")")}
    offset = _hex("KERNELOFFSET", entries["KERNELOFFSET"]) if "KERNELOFFSET" in entries else 0
    return VmcoreInfo(
        osrelease=entries.get("OSRELEASE"),
        kernel_offset=offset,
        phys_base=numbers["phys_base"] & U64 if "phys_base" in numbers else None,
        pgtable_l5_enabled=bool(numbers.get("pgtable_l5_enabled", 0)),
        symbols=symbols,
        numbers=numbers,
        entries=entries,
    )


def _hex(key: str, value: str) -> int:
    try:
        n = int(value, 16)
    except ValueError:
        n = -1
    if not 0 <= n <= U64:
        raise InputError(f"VMCOREINFO {key}={value[:40]!r} is not a 64-bit hexadecimal number")
    return n


def _number(key: str, value: str) -> int:
    """NUMBER() is "%ld" on x86 (decimal, maybe negative); other arches print "0x%lx"."""
    try:
        n = int(value, 16) if value.lower().startswith("0x") else int(value, 10)
    except ValueError:
        raise InputError(f"VMCOREINFO {key}={value[:40]!r} is not a number") from None
    if not -(1 << 63) <= n <= U64:
        raise InputError(f"VMCOREINFO {key}={value[:40]!r} does not fit in 64 bits")
    return n


# -- VMCOREINFO in the image's RAM ------------------------------------------

def find_vmcoreinfo(mem: PhysicalMemory) -> VmcoreInfo | None:
    """The kernel's VMCOREINFO as it keeps it in RAM, for a dump without the
    note: the first copy (``vmcoreinfo_data`` or ``vmcoreinfo_note``, see the
    module docstring) that decodes and that the image's own page tables
    confirm (confirmation_failure()); None when no frame holds one.

    One pass over the frames: the first word of every frame (and word 3,
    the note's text) is compared in blocks; only frames that start the text
    are decoded. Decoys cost one decode each, and at most MAX_CANDIDATES
    distinct texts are judged."""
    judged: set[bytes] = set()
    for pa, text in candidate_texts(mem):
        if text in judged:
            continue
        if len(judged) >= MAX_CANDIDATES:
            return None
        judged.add(text)
        info = _decoded(text)
        if info is not None and confirmation_failure(mem, info) is None:
            return dataclasses.replace(info, found_at=pa)
    return None


def candidate_texts(mem: PhysicalMemory) -> Iterator[tuple[int, bytes]]:
    """(physical address, bytes) of every place that starts as VMCOREINFO's
    text does: a frame opening with ``OSRELEASE=`` (the data page; the text
    runs to its first NUL), or a VMCOREINFO ELF note opening a frame (the
    text at byte 24, its length the note's n_descsz)."""
    for pfns, frames in mem.frame_blocks():
        data = frames[:, 0] == OSRELEASE_WORD
        note = ((frames[:, 3] == OSRELEASE_WORD) & (frames[:, 2] == NOTE_NAME_TAIL)
                & ((frames[:, 0] & np.uint64(U64 >> 32)) == NOTE_NAMESZ))
        for row in np.flatnonzero(data | note).tolist():
            pa = int(pfns[row]) << e.PAGE_SHIFT
            if data[row]:
                yield pa, frames[row].tobytes().partition(b"\0")[0]
                continue
            size = min(int(frames[row, 0]) >> 32, VMCOREINFO_BYTES)
            try:
                text = mem.read(pa + NOTE_TEXT_AT, size)  # a full page of text runs 24 bytes into the next frame
            except FrameOutsideMemory:
                continue
            yield pa + NOTE_TEXT_AT, text.partition(b"\0")[0]


def _decoded(text: bytes) -> VmcoreInfo | None:
    """The text decoded, or None when it is not what vmcoreinfo_append_str()
    writes: printable ASCII ``KEY=VALUE`` lines, each ending in a newline."""
    if not text.endswith(b"\n") or not text.startswith(b"OSRELEASE="):
        return None
    if any(c < 0x20 and c != 0x0A or c > 0x7E for c in text):
        return None
    if any(b"=" not in line for line in text[:-1].split(b"\n")):
        return None
    try:
        return parse_vmcoreinfo(text)
    except InputError:
        return None


def confirmation_failure(mem: PhysicalMemory, info: VmcoreInfo) -> str | None:
    """Why this VMCOREINFO does not describe the kernel whose memory mem holds,
    or None when it does. A text anyone could write (or a real one from another
    boot) is not enough: the x86-64 entries must agree with each other and with
    the tables at init_top_pgt, which must map the kernel image at the slid
    addresses the text names (arch_crash_save_vmcoreinfo(): phys_base,
    init_top_pgt, pgtable_l5_enabled, KERNELOFFSET)."""
    if info.entries.get("PAGESIZE") != "4096":
        return f"PAGESIZE is {info.entries.get('PAGESIZE')!r}, not x86-64's 4096"
    if "KERNELOFFSET" not in info.entries or info.phys_base is None:
        return "no KERNELOFFSET or NUMBER(phys_base): not written by an x86-64 kernel"
    if info.kernel_offset % KASLR_ALIGN or info.kernel_offset >= KERNEL_IMAGE_SIZE:
        return f"KERNELOFFSET {info.kernel_offset:#x} is no KASLR slide (2 MiB-aligned, under 1 GiB)"
    stext, pgd_va = info.symbols.get("_stext"), info.symbols.get("init_top_pgt")
    if stext is None or pgd_va is None:
        return "no SYMBOL(_stext) or SYMBOL(init_top_pgt)"
    for name, va in (("_stext", stext), ("init_top_pgt", pgd_va)):
        if not START_KERNEL_MAP <= va - info.kernel_offset < START_KERNEL_MAP + KERNEL_IMAGE_SIZE:
            return f"SYMBOL({name}) {va:#x} less KERNELOFFSET lies outside the kernel image"
    pgd = info.pa_symbol(pgd_va)
    why = _kernel_top_level_failure(mem, pgd)
    if why:
        return why
    geometry = Geometry(info.levels)
    for name, va in (("_stext", stext), ("init_top_pgt", pgd_va)):
        try:
            pa = translate(mem, CR3(pgd), va, geometry).pa
        except (PageFault, FrameOutsideMemory, ValueError):
            return f"the tables at init_top_pgt (pa {pgd:#x}) do not map SYMBOL({name}) {va:#x}"
        if pa != info.pa_symbol(va):
            return (f"the tables at init_top_pgt (pa {pgd:#x}) map SYMBOL({name}) {va:#x} to pa {pa:#x}, "
                    f"not to {info.pa_symbol(va):#x} as phys_base says")
    return None


def _kernel_top_level_failure(mem: PhysicalMemory, pgd: int) -> str | None:
    """Why the frame at pgd is not a kernel's top-level table: held, its kernel
    half present at slot 511 (the kernel image), no PS in a present entry."""
    pfn = pgd >> e.PAGE_SHIFT
    if pgd >> 52 or not mem.frames_present(np.array([pfn], np.uint64))[0]:
        return f"init_top_pgt (pa {pgd:#x}) lies outside the image"
    half = mem.read_frame(pfn)[256:]
    present = (half & np.uint64(e.P)) != 0
    if not present[-1]:
        return f"init_top_pgt (pa {pgd:#x}) does not map the kernel image's slot 511"
    if (present & ((half & np.uint64(e.PS)) != 0)).any():
        return f"init_top_pgt (pa {pgd:#x}) sets PS in a top-level entry: not a page table"
    return None
