"""CR3 as SDM vol. 3 4.5 defines it, and the PTI conventions Linux layers on it."""

from __future__ import annotations

from dataclasses import dataclass

CR3_ADDRESS_MASK = 0x000F_FFFF_FFFF_F000
CR3_PCID_MASK = 0xFFF
CR3_NOFLUSH = 1 << 63  # on a MOV to CR3 with CR4.PCIDE: keep this PCID's TLB entries

# arch/x86/entry/calling.h: the user PGD is the kernel PGD + 4 KiB, the user
# PCID the kernel PCID with bit 11 set, so the entry code switches with two ORs.
PTI_USER_PGTABLE_BIT = 12
PTI_USER_PCID_BIT = 11
PTI_SWITCH_MASK = (1 << PTI_USER_PGTABLE_BIT) | (1 << PTI_USER_PCID_BIT)


@dataclass(frozen=True)
class CR3:
    value: int
    pcide: bool = False  # CR4.PCIDE: without it bits 3 and 4 are PWT/PCD, not a PCID

    @property
    def pgd(self) -> int:
        """Physical address of the top-level table."""
        return self.value & CR3_ADDRESS_MASK

    @property
    def pcid(self) -> int:
        return self.value & CR3_PCID_MASK if self.pcide else 0

    @property
    def noflush(self) -> bool:
        return bool(self.value & CR3_NOFLUSH) and self.pcide

    @property
    def is_user_half_of_pair(self) -> bool:
        return bool(self.pgd & (1 << PTI_USER_PGTABLE_BIT))

    def user(self) -> "CR3":
        """The CR3 the PTI exit path loads: user PGD, and user PCID under PCID."""
        mask = PTI_SWITCH_MASK if self.pcide else 1 << PTI_USER_PGTABLE_BIT
        return CR3(self.value | mask, self.pcide)

    def kernel(self) -> "CR3":
        mask = PTI_SWITCH_MASK if self.pcide else 1 << PTI_USER_PGTABLE_BIT
        return CR3(self.value & ~mask, self.pcide)

    def __str__(self) -> str:
        return f"{self.value:#018x}"
