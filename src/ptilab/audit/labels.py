"""Names for addresses: which cpu_entry_area piece, by the linux-6.1 layout."""

from __future__ import annotations

from ptilab.linux.profiles import CPU_ENTRY_AREA_BASE, LINUX_6_1, Profile


def cea_piece(va: int, profile: Profile = LINUX_6_1) -> str:
    """'gdt', 'tss', 'estacks.DF_stack', 'idt', or 'guard/unused' for a
    cpu_entry_area address of a kernel without randomised area."""
    offset = va - CPU_ENTRY_AREA_BASE
    for piece in profile.header:
        if piece.offset <= offset < piece.offset + piece.pages * 4096:
            return piece.name
    cpu_offset = (offset - profile.first_cpu_offset) % profile.stride
    for piece in profile.per_cpu:
        if piece.offset <= cpu_offset < piece.offset + piece.pages * 4096:
            return piece.name
    return "guard/unused"
