"""Names of the regions of an x86-64 Linux address space (Documentation/arch/x86/x86_64/mm.rst)."""

from __future__ import annotations

import numpy as np

from ptilab.linux.profiles import CPU_ENTRY_AREA_BASE, ESPFIX_BASE_ADDR, LINUX_6_1, START_KERNEL_MAP, Profile
from ptilab.paging import EFF_NX, EFF_RW, Geometry, split_at
from ptilab.paging import entry as e

P4D_SIZE = 1 << 39
VSYSCALL_ADDR = 0xFFFF_FFFF_FF60_0000
# __START_KERNEL_map + KERNEL_IMAGE_SIZE: 1 GiB with CONFIG_RANDOMIZE_BASE (Debian), KASLR or not.
MODULES_VADDR = 0xFFFF_FFFF_C000_0000
# A user view mapping more kernel memory than this has not been isolated.
PTI_OFF_BYTES = 64 << 20

# (start, end, name) for a nokaslr kernel; page_offset/vmalloc/vmemmap move with KASLR.
# The image gets 1 GiB (KERNEL_IMAGE_SIZE with CONFIG_RANDOMIZE_BASE), modules follow it.
# Above the vmemmap the layout is the same in both paging modes.
_TOP = (
    (CPU_ENTRY_AREA_BASE, CPU_ENTRY_AREA_BASE + (1 << 39), "cpu_entry_area"),
    (ESPFIX_BASE_ADDR, ESPFIX_BASE_ADDR + (1 << 39), "espfix"),
    (0xFFFF_FFEF_0000_0000, 0xFFFF_FFFF_0000_0000, "EFI runtime"),
    (START_KERNEL_MAP, 0xFFFF_FFFF_C000_0000, "kernel image"),
    (0xFFFF_FFFF_C000_0000, 0xFFFF_FFFF_FF00_0000, "modules"),
    (0xFFFF_FFFF_FF00_0000, 0xFFFF_FFFF_FFFF_FFFF, "fixmap"),
)
REGIONS = {
    4: (
        (0x0000_0000_0000_0000, 0x0000_8000_0000_0000, "user space"),
        (0xFFFF_8880_0000_0000, 0xFFFF_C880_0000_0000, "direct map"),
        (0xFFFF_C900_0000_0000, 0xFFFF_E900_0000_0000, "vmalloc"),
        (0xFFFF_EA00_0000_0000, 0xFFFF_EB00_0000_0000, "vmemmap"),
    ) + _TOP,
    5: (
        (0x0000_0000_0000_0000, 0x0100_0000_0000_0000, "user space"),
        (0xFF11_0000_0000_0000, 0xFF91_0000_0000_0000, "direct map"),
        (0xFFA0_0000_0000_0000, 0xFFD2_0000_0000_0000, "vmalloc"),
        (0xFFD4_0000_0000_0000, 0xFFD6_0000_0000_0000, "vmemmap"),
    ) + _TOP,
}


def region_of(va: int, levels: int = 4) -> str:
    for start, end, name in REGIONS[levels]:
        if start <= va < end:
            return name
    return "unused hole"


# -- what PTI puts in the user tables, by name ----------------------------------------
# The one labelling of a user view's kernel half: audit's checks, meltdown's
# readable regions, the HTML map and ptilab diff all name a range through it.

PTI_KINDS = ("cpu_entry_area", "espfix", "entry text", "vsyscall page", "cpu_tss_rw pages", "kernel text clone")


def direct_map(geometry: Geometry) -> tuple[int, int]:
    (window,) = [(start, end) for start, end, name in REGIONS[geometry.levels] if name == "direct map"]
    return window


def entry_text(symbols: dict[str, int]) -> tuple[int, int] | None:
    """The PMDs pti_clone_entry_text() clones, when the symbols name the entry text."""
    start = symbols.get("__entry_text_start")
    if start is None:
        return None
    end = symbols.get("__entry_text_end", start + 1)
    pmd = 1 << 21
    return start & ~(pmd - 1), (end + pmd - 1) & ~(pmd - 1)


def kernel_text_clone(symbols: dict[str, int]) -> tuple[int, int] | None:
    """What pti_clone_kernel_text() maps into the user tables when
    pti_kernel_image_global_ok() (PTI auto, no PCID): [_text,
    __end_rodata_aligned), "do not clone the areas past rodata, they might
    contain secrets" (pti.c)."""
    start = symbols.get("_text")
    end = symbols.get("__end_rodata_aligned", symbols.get("__end_rodata_hpage_align"))
    if start is None or end is None:
        return None
    return start & ~(e.PAGE_SIZE - 1), end


def class_edges(geometry: Geometry, symbols: dict[str, int]) -> np.ndarray:
    """Addresses where classify_ranges() may judge a range differently (sorted):
    between two of them, where a range lies changes nothing."""
    edges = [geometry.kernel_half_start(), CPU_ENTRY_AREA_BASE, CPU_ENTRY_AREA_BASE + P4D_SIZE,
             ESPFIX_BASE_ADDR, ESPFIX_BASE_ADDR + P4D_SIZE, START_KERNEL_MAP, MODULES_VADDR,
             VSYSCALL_ADDR, VSYSCALL_ADDR + e.PAGE_SIZE, *direct_map(geometry), *(entry_text(symbols) or ()),
             *(kernel_text_clone(symbols) or ())]
    return np.unique(np.array([a & 0xFFFF_FFFF_FFFF_FFFF for a in edges], dtype=np.uint64))


def count(copies: np.ndarray, mask: np.ndarray) -> int:
    """How many ranges mask selects, each counted as often as it appears."""
    return int(copies[mask].sum())


def weighed_bytes(r: np.ndarray, copies: np.ndarray, mask: np.ndarray | slice = slice(None)) -> int:
    return int((r["size"][mask].astype(object) * copies[mask]).sum()) if len(r) else 0


def present_kernel_half(r: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Which ranges are present and in the kernel half."""
    return ((r["prot"] & np.uint64(e.P)) != 0) & (r["va"] >= np.uint64(geometry.kernel_half_start()))


def within(r: np.ndarray, start: int, end: int) -> np.ndarray:
    return (r["va"] >= np.uint64(start)) & (r["va"] <= np.uint64(end - 1))


def classify_ranges(user: np.ndarray, copies: np.ndarray, geometry: Geometry, symbols: dict[str, int],
                    nr_cpus_hint: int = 8192) -> dict[str, np.ndarray]:
    """Sort a user view's kernel-half mappings into what PTI allows there
    and what it does not: a mask per kind (PTI_KINDS and "leak") over the
    present kernel-half ranges ("_ranges", split where a kind may change,
    each with its "_copies")."""
    # A range is judged by where it starts: split those that reach into another class of address.
    r, origin = split_at(user, class_edges(geometry, symbols))
    copies = copies[origin]
    keep = present_kernel_half(r, geometry)
    r, copies = r[keep], copies[keep]
    cea = within(r, CPU_ENTRY_AREA_BASE, CPU_ENTRY_AREA_BASE + P4D_SIZE)
    espfix = within(r, ESPFIX_BASE_ADDR, ESPFIX_BASE_ADDR + P4D_SIZE)
    image = within(r, START_KERNEL_MAP, MODULES_VADDR)
    vsyscall = within(r, VSYSCALL_ADDR, VSYSCALL_ADDR + e.PAGE_SIZE)
    text = entry_text(symbols)
    if text is not None:
        entry = image & within(r, *text)
    else:
        # Without symbols: pti_clone_entry_text() clones whole PMDs, a few MiB at most.
        entry = image if weighed_bytes(r, copies, image) <= 4 << 20 else np.zeros(len(r), bool)
    # pti_clone_user_shared(): one 4 KiB RW NX page per possible CPU, elsewhere in the kernel half.
    small = (r["size"] == np.uint64(e.PAGE_SIZE)) & ((r["eff"] & EFF_RW) != 0) & ((r["eff"] & EFF_NX) != 0)
    other = ~(cea | espfix | image | vsyscall)
    tss = other & small
    if count(copies, tss) > nr_cpus_hint:
        tss[:] = False
    # pti_clone_kernel_text(): read-only, and (with symbols) within text and rodata. A writable
    # page there, or one past rodata, is no part of it and stays a leak.
    clone = image & ~entry & ((r["eff"] & EFF_RW) == 0)
    clone_range = kernel_text_clone(symbols)
    if clone_range is not None:
        clone &= within(r, *clone_range) & (r["va"] + r["size"] <= np.uint64(clone_range[1]))
    leak = ~(cea | espfix | entry | vsyscall | tss | clone)
    return {"cpu_entry_area": cea, "espfix": espfix, "entry text": entry, "vsyscall page": vsyscall,
            "cpu_tss_rw pages": tss, "kernel text clone": clone, "leak": leak, "_ranges": r, "_copies": copies}


def isolated(kinds: dict[str, np.ndarray]) -> bool:
    """Whether the user view is PTI's (maps less than PTI_OFF_BYTES beyond what PTI allows)."""
    return weighed_bytes(kinds["_ranges"], kinds["_copies"], kinds["leak"]) < PTI_OFF_BYTES


def cea_piece(va: int, profile: Profile = LINUX_6_1) -> str:
    """'gdt', 'tss', 'estacks.DF_stack', 'idt', or 'guard/unused' for a
    cpu_entry_area address (a per-CPU piece by its offset within its CPU's
    area: the same with randomised slots, whose areas keep 6.1's stride)."""
    offset = va - CPU_ENTRY_AREA_BASE
    for piece in profile.header:
        if piece.offset <= offset < piece.offset + piece.pages * 4096:
            return piece.name
    cpu_offset = (offset - profile.first_cpu_offset) % profile.stride
    for piece in profile.per_cpu:
        if piece.offset <= cpu_offset < piece.offset + piece.pages * 4096:
            return piece.name
    return "guard/unused"


def label_kinds(kinds: dict[str, np.ndarray], geometry: Geometry, profile: Profile = LINUX_6_1) -> np.ndarray:
    """A name for each of classify_ranges()'s ranges: 'cpu_entry_area PIECE',
    'entry text', 'espfix', 'cpu_tss_rw', 'vsyscall page', 'kernel text
    clone' for what PTI maps on purpose, else the region the range lies in
    ('direct map', 'kernel text' or 'kernel data' for the image, 'modules',
    'vmalloc', ...). A view that is not isolated (PTI off) has no cpu_tss_rw
    or clone to speak of: there the per-CPU pages are the direct map's and
    the image is the image."""
    r = kinds["_ranges"]
    names = np.empty(len(r), dtype=object)
    va = r["va"].tolist()
    names[:] = [region_of(a, geometry.levels) for a in va]
    image = names == "kernel image"
    names[image & ((r["eff"] & EFF_NX) == 0)] = "kernel text"
    names[image & ((r["eff"] & EFF_NX) != 0)] = "kernel data"
    pti = isolated(kinds)
    for kind in ("espfix", "entry text", "vsyscall page", "cpu_tss_rw pages", "kernel text clone"):
        if pti or kind not in ("cpu_tss_rw pages", "kernel text clone"):
            names[kinds[kind]] = kind.removesuffix(" pages")
    for i in np.flatnonzero(kinds["cpu_entry_area"]).tolist():
        names[i] = f"cpu_entry_area {cea_piece(va[i], profile)}"
    return names


def label_ranges(user: np.ndarray, copies: np.ndarray | None, geometry: Geometry, symbols: dict[str, int] | None = None,
                 profile: Profile = LINUX_6_1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A user view's present kernel-half ranges (split where a name may change),
    how many times each appears, and each one's name (label_kinds())."""
    copies = np.ones(len(user), np.int64) if copies is None else copies
    kinds = classify_ranges(user, copies, geometry, symbols or {})
    return kinds["_ranges"], kinds["_copies"], label_kinds(kinds, geometry, profile)
