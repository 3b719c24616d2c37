"""The TLB as SDM vol. 3 4.10.2 describes it: cached translations, tagged by
PCID, with global translations usable under any PCID, and the invalidations
of 4.10.4 (MOV to CR3, INVLPG, INVPCID).

Like a real core it keeps 4 KiB translations and large (2 MiB / 1 GiB) ones
in separate set-associative arrays, each set replaced in LRU order. Sizes are
parameters; the defaults are a Skylake-class L1 DTLB (64 entries 4-way for
4 KiB, 32 entries 4-way for 2 MiB and 1 GiB).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

# The tag a global translation carries: it matches every PCID (SDM 4.10.2.4).
GLOBAL = -1

INVPCID_INDIVIDUAL_ADDRESS = 0
INVPCID_SINGLE_CONTEXT = 1
INVPCID_ALL_INCLUDING_GLOBAL = 2
INVPCID_ALL_NON_GLOBAL = 3


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


Key = tuple[int, int, int]  # (page_shift, vpn, tag)


class TLBArray:
    """One set-associative array of translations for a fixed set of page sizes."""

    def __init__(self, entries: int, ways: int, page_shifts: tuple[int, ...]):
        if entries <= 0 or ways <= 0 or entries % ways:
            raise ValueError(f"a TLB array needs entries a multiple of ways, not {entries}/{ways}")
        self.ways = ways
        self.nsets = entries // ways
        self.page_shifts = page_shifts
        self.sets: list[OrderedDict[Key, TLBEntry]] = [OrderedDict() for _ in range(self.nsets)]
        # Bumped on every fill or invalidation, so the vectorised hit test can
        # keep its sorted arrays of resident pages until the contents change.
        self.version = 0
        self._resident: dict[int, tuple[int, list[np.ndarray]]] = {}

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

    def touch(self, shift: int, vpn: int, pcid: int) -> None:
        """Make the entry a lookup would hit most recently used (the vectorised path's LRU update)."""
        s = self.sets[vpn % self.nsets]
        for key in ((shift, vpn, pcid), (shift, vpn, GLOBAL)):
            if key in s:
                s.move_to_end(key)
                return
        raise AssertionError(f"touch of a page not in the TLB: {vpn:#x} << {shift}")

    def fill(self, entry: TLBEntry) -> TLBEntry | None:
        """Insert entry; returns the least recently used entry it evicted, if any."""
        s = self.sets[entry.vpn % self.nsets]
        key = (entry.page_shift, entry.vpn, entry.tag)
        s.pop(key, None)
        s[key] = entry
        self.version += 1
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
        if dropped:
            self.version += 1
        return dropped

    def invalidate_page(self, va: int, tags: tuple[int, ...]) -> None:
        for shift in self.page_shifts:
            vpn = va >> shift
            s = self.sets[vpn % self.nsets]
            for tag in tags:
                if s.pop((shift, vpn, tag), None) is not None:
                    self.version += 1

    def resident(self, pcid: int) -> list[np.ndarray]:
        """Per page size, the sorted vpns a lookup under pcid would hit."""
        cached = self._resident.get(pcid)
        if cached is not None and cached[0] == self.version:
            return cached[1]
        found: dict[int, list[int]] = {shift: [] for shift in self.page_shifts}
        for s in self.sets:
            for shift, vpn, tag in s:
                if tag == pcid or tag == GLOBAL:
                    found[shift].append(vpn)
        arrays = [np.unique(np.array(found[shift], dtype=np.uint64)) for shift in self.page_shifts]
        self._resident[pcid] = (self.version, arrays)
        return arrays

    def __len__(self) -> int:
        return sum(len(s) for s in self.sets)

    def entries(self) -> list[TLBEntry]:
        return [entry for s in self.sets for entry in s.values()]


class TLB:
    """The data TLB: a 4 KiB array and a large-page array, looked up in that order."""

    def __init__(self, entries_4k: int = 64, ways_4k: int = 4, entries_large: int = 32, ways_large: int = 4):
        self.small = TLBArray(entries_4k, ways_4k, (12,))
        self.large = TLBArray(entries_large, ways_large, (21, 30))
        self.arrays = (self.small, self.large)

    def lookup(self, va: int, pcid: int) -> TLBEntry | None:
        return self.small.lookup(va, pcid) or self.large.lookup(va, pcid)

    def fill(self, entry: TLBEntry) -> TLBEntry | None:
        return (self.small if entry.page_shift == 12 else self.large).fill(entry)

    # -- invalidation, SDM 4.10.4.1 ------------------------------------------------
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
        for array in self.arrays:
            if kind == INVPCID_INDIVIDUAL_ADDRESS:
                array.invalidate_page(va, (pcid,))
            elif kind == INVPCID_SINGLE_CONTEXT:
                array.invalidate(lambda entry: entry.global_ or entry.pcid != pcid)
            elif kind == INVPCID_ALL_INCLUDING_GLOBAL:
                array.invalidate(lambda entry: False)
            elif kind == INVPCID_ALL_NON_GLOBAL:
                array.invalidate(lambda entry: entry.global_)
            else:
                raise ValueError(f"INVPCID type {kind} is reserved (#GP)")

    def __len__(self) -> int:
        return len(self.small) + len(self.large)

    def entries(self) -> list[TLBEntry]:
        return self.small.entries() + self.large.entries()
