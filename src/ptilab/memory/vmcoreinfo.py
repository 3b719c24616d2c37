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

``init_top_pgt`` is ``swapper_pg_dir``, the kernel PGD of init_mm; under PTI
its user twin sits 4 KiB above it (an order-1 pair, as every mm's). A
kernel-image address becomes physical as ``__pa_symbol()`` computes it::

    >>> info = parse_vmcoreinfo(core.vmcoreinfo_text)
    >>> hex(info.kernel_pgd), info.levels, hex(info.kernel_offset)
    ('0x7c10000', 4, '0x6a00000')
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ptilab.errors import InputError

# __START_KERNEL_map (arch/x86/include/asm/page_64_types.h): where the kernel
# image is mapped before the KASLR slide; __pa_symbol(x) = x - it + phys_base.
START_KERNEL_MAP = 0xFFFFFFFF80000000
PTI_USER_PGD_OFFSET = 0x1000  # PTI_USER_PGTABLE_BIT is bit 12 of the PGD's address
U64 = (1 << 64) - 1


@dataclass(frozen=True)
class VmcoreInfo:
    """The VMCOREINFO entries ptilab uses, decoded, and all the others as given.

    osrelease: ``OSRELEASE`` (the kernel's ``uname -r``), or None.
    kernel_offset: ``KERNELOFFSET``, the KASLR slide of the kernel image (0 without KASLR).
    phys_base: ``NUMBER(phys_base)`` as the unsigned 64-bit value the kernel holds.
    pgtable_l5_enabled: ``NUMBER(pgtable_l5_enabled)``: 5-level paging was on.
    symbols: every ``SYMBOL(name)``: its running virtual address.
    numbers: every ``NUMBER(name)``, as a signed integer.
    entries: every line, ``KEY`` to ``VALUE`` text.
    """

    osrelease: str | None
    kernel_offset: int
    phys_base: int
    pgtable_l5_enabled: bool
    symbols: dict[str, int] = field(repr=False)
    numbers: dict[str, int] = field(repr=False)
    entries: dict[str, str] = field(repr=False)

    @property
    def levels(self) -> int:
        """Paging levels the kernel ran with: 5 when LA57 was enabled, else 4."""
        return 5 if self.pgtable_l5_enabled else 4

    def pa_symbol(self, va: int) -> int:
        """Physical address of a kernel-image virtual address, as ``__pa_symbol()``."""
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

    Raises InputError when a value ptilab needs is malformed or
    ``NUMBER(phys_base)`` is missing (without it no kernel-image address
    can be made physical).
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
    if "phys_base" not in numbers:
        raise InputError("VMCOREINFO has no NUMBER(phys_base): kernel-image addresses cannot be made physical")
    offset = _hex("KERNELOFFSET", entries["KERNELOFFSET"]) if "KERNELOFFSET" in entries else 0
    return VmcoreInfo(
        osrelease=entries.get("OSRELEASE"),
        kernel_offset=offset,
        phys_base=numbers["phys_base"] & U64,
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
