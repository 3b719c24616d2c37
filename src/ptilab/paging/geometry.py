"""Shape of the x86-64 paging hierarchy: 4-level (PML4) or 5-level (LA57, PML5).

Depth 0 is the table CR3 points at. Names are Linux's: with 5-level paging the
PML5 is the pgd and the PML4 the p4d; with 4-level paging the PML4 is the pgd
(Linux folds its p4d into it at run time).
"""

from __future__ import annotations

from dataclasses import dataclass

from ptilab.errors import UsageError


@dataclass(frozen=True)
class Geometry:
    levels: int = 4

    def __post_init__(self) -> None:
        if self.levels not in (4, 5):
            raise UsageError(f"paging must be 4 or 5 levels, not {self.levels}")

    @property
    def names(self) -> tuple[str, ...]:
        return ("pgd", "p4d", "pud", "pmd", "pte") if self.levels == 5 else ("pgd", "pud", "pmd", "pte")

    @property
    def va_bits(self) -> int:
        return 12 + 9 * self.levels

    def shift(self, depth: int) -> int:
        """log2 of the bytes one entry at this depth spans (39 for a 4-level pgd)."""
        return 12 + 9 * (self.levels - 1 - depth)

    def depth_of(self, name: str) -> int:
        return self.names.index(name)

    def leaf_allowed(self, depth: int) -> bool:
        """PS may be set only in a PDPTE (1 GiB) or a PDE (2 MiB); a PTE is always a leaf."""
        return depth >= self.levels - 3

    def index(self, va: int, depth: int) -> int:
        return (va >> self.shift(depth)) & 0x1FF

    def canonical(self, va: int) -> int:
        """Sign-extend an address from its top implemented bit (47, or 56 with LA57)."""
        bits = self.va_bits
        va &= (1 << bits) - 1
        if va >> (bits - 1):
            va |= ((1 << 64) - 1) ^ ((1 << bits) - 1)
        return va

    def is_canonical(self, va: int) -> bool:
        return self.canonical(va) == va

    def kernel_half_start(self) -> int:
        return self.canonical(1 << (self.va_bits - 1))

    def pgd_index(self, va: int) -> int:
        return self.index(va, 0)


FOUR_LEVEL = Geometry(4)
FIVE_LEVEL = Geometry(5)
