"""What a page walk goes through besides the TLB: the paging-structure caches
(SDM vol. 3 4.10.3) and the data cache its entry loads land in.

A walk's loads are 8-byte entries; the memory system moves 64-byte lines, so
eight neighbouring entries of one table share a line. Two views whose walks
read the *same* table pages read the same lines, and the second view's walk
hits in the cache the first one warmed: that is the seed's "fewer cache
lines needed to refill the TLB", made countable.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ptilab.paging.geometry import Geometry

LINE_SHIFT = 6  # 64-byte cache lines: eight page-table entries each


class DataCache:
    """A fully associative LRU cache of 64-byte lines, fed only by page-walk loads."""

    def __init__(self, lines: int = 512):  # 32 KiB, an L1D
        if lines <= 0:
            raise ValueError(f"a cache needs at least one line, not {lines}")
        self.capacity = lines
        self._lines: OrderedDict[int, None] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def load(self, pa: int) -> bool:
        """Load the line holding pa; True on a hit."""
        line = pa >> LINE_SHIFT
        if line in self._lines:
            self._lines.move_to_end(line)
            self.hits += 1
            return True
        self._lines[line] = None
        if len(self._lines) > self.capacity:
            self._lines.popitem(last=False)
        self.misses += 1
        return False

    def __contains__(self, pa: int) -> bool:
        return pa >> LINE_SHIFT in self._lines


@dataclass(frozen=True)
class CachedEntry:
    """A paging-structure-cache entry: where the next table is and the rights so far."""

    table: int  # physical address of the table the cached entry points at
    writable: bool
    user: bool
    executable: bool


def cache_names(geometry: Geometry) -> tuple[str, ...]:
    """SDM names of the caches, top level first: PML4E, PDPTE, PDE (and PML5E with LA57)."""
    return (("PML5E",) if geometry.levels == 5 else ()) + ("PML4E", "PDPTE", "PDE")


class PagingStructureCaches:
    """One LRU cache per non-leaf level, keyed by PCID and the address bits
    that select the entry (47:39 for a PML4E, 47:30 for a PDPTE, 47:21 for a
    PDE). Only entries that reference a table are cached, never a leaf: a
    2 MiB PDE goes to the TLB. A hit at the PDE cache leaves one load (the
    PTE) for the walk; a hit at the PDPTE cache two; and so on (SDM 4.10.3.2)."""

    def __init__(self, geometry: Geometry, sizes: dict[str, int] | None = None):
        self.geometry = geometry
        self.names = cache_names(geometry)
        sizes = {"PML5E": 2, "PML4E": 4, "PDPTE": 4, "PDE": 32} | (sizes or {})
        self.sizes = tuple(sizes[name] for name in self.names)
        self._caches: list[OrderedDict[tuple[int, int], CachedEntry]] = [OrderedDict() for _ in self.names]
        self._mask = (1 << geometry.va_bits) - 1
        self._shifts = tuple(geometry.shift(d) for d in range(len(self.names)))

    def lookup(self, va: int, pcid: int) -> tuple[int, CachedEntry] | None:
        """The deepest cached entry for va: (depth of the entry, entry), or None."""
        va &= self._mask
        for depth in range(len(self.names) - 1, -1, -1):
            cache = self._caches[depth]
            key = (pcid, va >> self._shifts[depth])
            entry = cache.get(key)
            if entry is not None:
                cache.move_to_end(key)
                return depth, entry
        return None

    def fill(self, depth: int, va: int, pcid: int, entry: CachedEntry) -> None:
        cache = self._caches[depth]
        key = (pcid, (va & self._mask) >> self._shifts[depth])
        cache.pop(key, None)
        cache[key] = entry
        if len(cache) > self.sizes[depth]:
            cache.popitem(last=False)

    def flush_pcid(self, pcid: int) -> None:
        """MOV to CR3 without NOFLUSH, INVPCID single-context: this PCID's entries go."""
        for cache in self._caches:
            for key in [k for k in cache if k[0] == pcid]:
                del cache[key]

    def flush_all(self) -> None:
        """INVLPG drops every entry of the current PCID whatever its address
        (SDM 4.10.4.1); INVPCID types 2 and 3 drop them all. Callers pick."""
        for cache in self._caches:
            cache.clear()

    def __len__(self) -> int:
        return sum(len(c) for c in self._caches)
