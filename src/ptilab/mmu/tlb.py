"""The TLBs of one core as SDM vol. 3 4.10.2 describes them: cached
translations, tagged by PCID, with global translations usable under any
PCID, and the invalidations of 4.10.4 (MOV to CR3, INVLPG, INVPCID).

Like a real core it has a hierarchy: a first-level data TLB and instruction
TLB, each made of set-associative arrays per page size, backed by a
second-level TLB (Intel's unified STLB; AMD's split L2 DTLB and L2 ITLB).
A lookup that misses the first level and hits the second refills the first;
a walk fills both. Each set is replaced in LRU order (real cores use
pseudo-LRU; LRU is the model's documented simplification). Every
invalidation applies to every array, as it does on hardware.

Named cores (CORES) give the figures of real parts; the default is
Skylake's. This module is the scalar reference; ptilab.mmu.fast runs the
same rules over whole traces in compiled code.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ptilab.errors import one_of

# The tag a global translation carries: it matches every PCID (SDM 4.10.2.4).
GLOBAL = -1

INVPCID_INDIVIDUAL_ADDRESS = 0
INVPCID_SINGLE_CONTEXT = 1
INVPCID_ALL_INCLUDING_GLOBAL = 2
INVPCID_ALL_NON_GLOBAL = 3

# Where an access found its translation.
L1, STLB, WALK = "L1", "STLB", "walk"


@dataclass(frozen=True)
class TLBEntry:
    """One cached translation: a page's frame and the rights of the walk that filled it."""

    vpn: int  # va >> page_shift
    page_shift: int  # 12, 21 or 30
    pcid: int  # the PCID it was filled under (GLOBAL entries still remember it)
    global_: bool
    frame: int  # physical base of the page
    writable: bool
    user: bool
    executable: bool

    @property
    def tag(self) -> int:
        return GLOBAL if self.global_ else self.pcid

    def smashed(self, va: int, shift: int) -> "TLBEntry":
        """The piece of this (larger) page that holds va, as an entry of 1 << shift
        bytes: how a second-level TLB without 1 GiB entries keeps a 1 GiB page."""
        vpn = va >> shift
        frame = self.frame + ((vpn << shift) & ((1 << self.page_shift) - 1))
        return TLBEntry(vpn, shift, self.pcid, self.global_, frame, self.writable, self.user, self.executable)


Key = tuple[int, int, int]  # (page_shift, vpn, tag)


@dataclass(frozen=True)
class ArrayShape:
    """One array of a TLB: entries, ways (entries == ways: fully associative)
    and the page sizes (as shifts) it holds."""

    entries: int
    ways: int
    page_shifts: tuple[int, ...]


@dataclass(frozen=True)
class TLBConfig:
    """A core's TLBs. istlb None: the second level is unified (Intel's STLB)
    and serves instruction fetches too. smash_1g: 1 GiB translations are kept
    in the second level as 2 MiB pieces (AMD Zen's "smashing")."""

    name: str
    dtlb: tuple[ArrayShape, ...]
    itlb: tuple[ArrayShape, ...]
    stlb: tuple[ArrayShape, ...]
    istlb: tuple[ArrayShape, ...] | None = None
    smash_1g: bool = False
    source: str = ""


def l1_only(entries_4k: int = 64, ways_4k: int = 4, entries_large: int = 32, ways_large: int = 4) -> TLBConfig:
    """A core with a data TLB and nothing behind it (small cases worked out by hand)."""
    dtlb = (ArrayShape(entries_4k, ways_4k, (12,)), ArrayShape(entries_large, ways_large, (21, 30)))
    return TLBConfig("l1-only", dtlb, dtlb, ())


_4K, _2M, _1G, _ALL = (12,), (21,), (30,), (12, 21, 30)

SKYLAKE = TLBConfig(
    "skylake",
    dtlb=(ArrayShape(64, 4, _4K), ArrayShape(32, 4, _2M), ArrayShape(4, 4, _1G)),
    itlb=(ArrayShape(128, 8, _4K), ArrayShape(8, 8, _2M)),
    stlb=(ArrayShape(1536, 12, (12, 21)), ArrayShape(16, 4, _1G)),
    source="Intel 64 and IA-32 Architectures Optimization Reference Manual (248966-045), Table 2-15, "
           "TLB parameters of the Skylake microarchitecture",
)

HASWELL = TLBConfig(
    "haswell",
    dtlb=(ArrayShape(64, 4, _4K), ArrayShape(32, 4, _2M), ArrayShape(4, 4, _1G)),
    itlb=(ArrayShape(128, 4, _4K), ArrayShape(8, 8, _2M)),
    stlb=(ArrayShape(1024, 8, (12, 21)),),  # no 1 GiB entries: a 1 GiB page lives in the DTLB only
    source="Intel Optimization Reference Manual (248966), TLB parameters of the Haswell microarchitecture "
           "(STLB 1024 entries 8-way, 4 KiB and 2 MiB)",
)

ZEN2 = TLBConfig(
    "zen2",
    dtlb=(ArrayShape(64, 64, _ALL),),
    itlb=(ArrayShape(64, 64, _ALL),),
    stlb=(ArrayShape(2048, 16, (12, 21)),),  # 12 "ways" skewed by page size in hardware; 2048 = 128 x 16 here
    istlb=(ArrayShape(512, 8, (12, 21)),),
    smash_1g=True,
    source="AMD Software Optimization Guide for Family 17h Models 30h (56305), 2.12 (L1 DTLB and ITLB 64 "
           "entries fully associative, all page sizes; L2 DTLB 2048, L2 ITLB 512 8-way, 4 KiB and 2 MiB, "
           "1 GiB pages smashed to 2 MiB); wikichip and 7-cpu.com agree",
)

GOLDMONT = TLBConfig(
    "goldmont",
    # The first level is assumed (the sources found give only the second):
    # 32 entries for 4 KiB, 16 for 2 MiB, fully associative; ITLB 48.
    dtlb=(ArrayShape(32, 32, _4K), ArrayShape(16, 16, _2M)),
    itlb=(ArrayShape(48, 48, _4K), ArrayShape(16, 16, _2M)),
    stlb=(ArrayShape(512, 4, _4K),),  # 4 KiB only: large pages live in the first level alone
    source="Intel Optimization Reference Manual (248966), chapter 16, Goldmont: a second-level TLB of 512 "
           "entries for 4 KiB pages (4-way assumed); the first-level sizes are assumptions, no source found",
)

CORES = {c.name: c for c in (SKYLAKE, HASWELL, ZEN2, GOLDMONT)}


def get_core(name: str) -> TLBConfig:
    return one_of(CORES, name, "core")


class TLBArray:
    """One set-associative array of translations for a fixed set of page sizes."""

    def __init__(self, entries: int, ways: int, page_shifts: tuple[int, ...]):
        if entries <= 0 or ways <= 0 or entries % ways:
            raise ValueError(f"a TLB array needs entries a multiple of ways, not {entries}/{ways}")
        self.ways = ways
        self.nsets = entries // ways
        self.page_shifts = page_shifts
        self.sets: list[OrderedDict[Key, TLBEntry]] = [OrderedDict() for _ in range(self.nsets)]

    def lookup(self, va: int, pcid: int) -> TLBEntry | None:
        """The entry translating va for pcid, made most recently used; None on a miss."""
        for shift in self.page_shifts:
            vpn = va >> shift
            s = self.sets[vpn % self.nsets]
            for key in ((shift, vpn, pcid), (shift, vpn, GLOBAL)):
                entry = s.get(key)
                if entry is not None:
                    s.move_to_end(key)
                    return entry
        return None

    def fill(self, entry: TLBEntry) -> TLBEntry | None:
        """Insert entry; returns the least recently used entry it evicted, if any."""
        s = self.sets[entry.vpn % self.nsets]
        key = (entry.page_shift, entry.vpn, entry.tag)
        s.pop(key, None)
        s[key] = entry
        if len(s) > self.ways:
            return s.popitem(last=False)[1]
        return None

    def invalidate(self, keep) -> int:
        """Drop every entry for which keep(entry) is false; returns how many."""
        dropped = 0
        for s in self.sets:
            for key in [k for k, entry in s.items() if not keep(entry)]:
                del s[key]
                dropped += 1
        return dropped

    def invalidate_page(self, va: int, tags: tuple[int, ...]) -> None:
        for shift in self.page_shifts:
            vpn = va >> shift
            s = self.sets[vpn % self.nsets]
            for tag in tags:
                s.pop((shift, vpn, tag), None)

    def __len__(self) -> int:
        return sum(len(s) for s in self.sets)

    def entries(self) -> list[TLBEntry]:
        return [entry for s in self.sets for entry in s.values()]


class TLBLevel:
    """One TLB (a DTLB, ITLB or second-level TLB): its arrays, looked up in order."""

    def __init__(self, shapes: tuple[ArrayShape, ...], smash_1g: bool = False):
        self.arrays = tuple(TLBArray(s.entries, s.ways, s.page_shifts) for s in shapes)
        self.smash_1g = smash_1g

    def lookup(self, va: int, pcid: int) -> TLBEntry | None:
        for array in self.arrays:
            entry = array.lookup(va, pcid)
            if entry is not None:
                return entry
        return None

    def fill(self, entry: TLBEntry, va: int) -> None:
        """Keep entry in the first array holding its page size (a 1 GiB page as
        the 2 MiB piece holding va when smashing); a size no array holds is not kept."""
        if self.smash_1g and entry.page_shift == 30:
            entry = entry.smashed(va, 21)
        for array in self.arrays:
            if entry.page_shift in array.page_shifts:
                array.fill(entry)
                return

    def __len__(self) -> int:
        return sum(len(a) for a in self.arrays)


class TLB:
    """A core's TLB hierarchy: DTLB and ITLB, then the second level."""

    def __init__(self, config: TLBConfig = SKYLAKE):
        self.config = config
        self.dtlb = TLBLevel(config.dtlb)
        self.itlb = TLBLevel(config.itlb)
        self.stlb = TLBLevel(config.stlb, config.smash_1g)
        self.istlb = self.stlb if config.istlb is None else TLBLevel(config.istlb, config.smash_1g)
        self.levels = tuple(dict.fromkeys((self.dtlb, self.itlb, self.stlb, self.istlb)))
        self.arrays = tuple(a for level in self.levels for a in level.arrays)

    def _sides(self, fetch: bool) -> tuple[TLBLevel, TLBLevel]:
        return (self.itlb, self.istlb) if fetch else (self.dtlb, self.stlb)

    def lookup(self, va: int, pcid: int, fetch: bool = False) -> tuple[TLBEntry | None, str]:
        """The entry translating va and where it was found (L1 or STLB); on a
        second-level hit the first level is refilled. (None, WALK) on a miss."""
        first, second = self._sides(fetch)
        entry = first.lookup(va, pcid)
        if entry is not None:
            return entry, L1
        entry = second.lookup(va, pcid)
        if entry is not None:
            first.fill(entry, va)
            return entry, STLB
        return None, WALK

    def fill(self, entry: TLBEntry, va: int, fetch: bool = False) -> None:
        """A walk's result goes to both levels of the side that missed."""
        first, second = self._sides(fetch)
        second.fill(entry, va)
        first.fill(entry, va)

    # -- invalidation, SDM 4.10.4.1: every level, every array ----------------------
    def flush_pcid(self, pcid: int) -> None:
        """MOV to CR3 without NOFLUSH (or with CR4.PCIDE=0, for PCID 000H):
        every non-global translation of that PCID goes; global ones stay."""
        for array in self.arrays:
            array.invalidate(lambda entry: entry.global_ or entry.pcid != pcid)

    def invlpg(self, va: int, pcid: int) -> None:
        """INVLPG: the page's translations for the current PCID, and global ones for it under any PCID."""
        for array in self.arrays:
            array.invalidate_page(va, (pcid, GLOBAL))

    def invpcid(self, kind: int, pcid: int = 0, va: int = 0) -> None:
        """INVPCID types 0-3 (individual address, single context, all with globals, all but globals)."""
        if kind not in (0, 1, 2, 3):
            raise ValueError(f"INVPCID type {kind} is reserved (#GP)")
        for array in self.arrays:
            if kind == INVPCID_INDIVIDUAL_ADDRESS:
                array.invalidate_page(va, (pcid,))
            elif kind == INVPCID_SINGLE_CONTEXT:
                array.invalidate(lambda entry: entry.global_ or entry.pcid != pcid)
            elif kind == INVPCID_ALL_INCLUDING_GLOBAL:
                array.invalidate(lambda entry: False)
            else:
                array.invalidate(lambda entry: entry.global_)

    def __len__(self) -> int:
        return sum(len(a) for a in self.arrays)

    def entries(self) -> list[TLBEntry]:
        return [entry for a in self.arrays for entry in a.entries()]
