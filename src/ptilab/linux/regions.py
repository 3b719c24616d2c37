"""Names of the regions of an x86-64 Linux address space (Documentation/arch/x86/x86_64/mm.rst)."""

from __future__ import annotations

from ptilab.linux.profiles import CPU_ENTRY_AREA_BASE, ESPFIX_BASE_ADDR, START_KERNEL_MAP

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
