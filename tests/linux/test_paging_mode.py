"""The paging mode of an image comes from its notes, VMCOREINFO or its tables, never from a silent default."""

import pytest

from ptilab.errors import InputError, UsageError
from ptilab.pti import boot
from ptilab.linux.paging_mode import CEA_RO_IDT, maps_cpu_entry_area, paging_mode
from ptilab.memory.elfcore import CR4_LA57, ElfCore
from ptilab.memory.elfwrite import qemu_cpu_note, write_memory_core
from ptilab.paging import FIVE_LEVEL, FOUR_LEVEL, walk
from ptilab.paging import entry as e
from ptilab.paging.install import map_page


def _kernel(levels: int):
    return boot("linux-6.1", "linux", cpus=1, levels=levels)


def _core(tmp_path, k, notes=()):
    """The model's tables exported as a core, with the notes given."""
    w = walk(k.ram, k.user_cr3(), k.geometry)
    frames = set(w.all_table_frames()) | set(walk(k.ram, k.kernel_cr3(), k.geometry).all_table_frames())
    write_memory_core(tmp_path / "core.elf", k.ram, frames, notes)
    return ElfCore(tmp_path / "core.elf")


@pytest.mark.parametrize("levels", [4, 5])
def test_the_tables_alone_say_which_depth_maps_the_cpu_entry_area(levels):
    k = _kernel(levels)
    cr3 = k.user_cr3().value
    assert maps_cpu_entry_area(k.ram, cr3, k.geometry)
    assert not maps_cpu_entry_area(k.ram, cr3, FIVE_LEVEL if levels == 4 else FOUR_LEVEL)
    assert paging_mode(k.ram, cr3).levels == levels
    assert paging_mode(k.ram, k.kernel_cr3().value, levels == 5).levels == levels


@pytest.mark.parametrize("levels", [4, 5])
def test_an_option_the_tables_contradict_is_refused(levels):
    k = _kernel(levels)
    with pytest.raises(InputError, match=f"map the cpu_entry_area \\({CEA_RO_IDT:#x}\\) only when walked with "
                                         f"{levels}-level"):
        paging_mode(k.ram, k.user_cr3().value, la57=levels == 4)


def test_the_cpu_notes_decide_and_a_contradicting_option_is_refused(tmp_path):
    k = _kernel(5)
    cr3 = k.user_cr3().value
    core = _core(tmp_path, k, [qemu_cpu_note(cr3=cr3 & ~0x1000, cr4=0x6F0 | CR4_LA57)])  # on the kernel half
    assert paging_mode(core, cr3).levels == 5
    with pytest.raises(UsageError, match="--no-la57: the core's CPU 0 notes .* on this PGD pair.* say 5-level"):
        paging_mode(core, cr3, la57=False)


def test_cpus_that_agree_speak_for_a_cr3_none_of_them_runs(tmp_path):
    k = _kernel(4)
    core = _core(tmp_path, k, [qemu_cpu_note(cr3=0x7000), qemu_cpu_note(cr3=0x9000)])
    with pytest.raises(UsageError, match="--la57: the core's notes of all 2 CPU\\(s\\) say 4-level"):
        paging_mode(core, k.user_cr3().value, la57=True)


def test_vmcoreinfo_pgtable_l5_enabled_decides_without_cpu_notes(tmp_path):
    k = _kernel(5)
    core = _core(tmp_path, k, [(b"VMCOREINFO", 0, b"OSRELEASE=6.1.0\nNUMBER(phys_base)=0\nNUMBER(pgtable_l5_enabled)=1\n")])
    assert paging_mode(core, k.user_cr3().value).levels == 5
    with pytest.raises(UsageError, match=r"--no-la57: VMCOREINFO \(NUMBER\(pgtable_l5_enabled\)=1\) says 5-level"):
        paging_mode(core, k.user_cr3().value, la57=False)


def test_a_tree_that_is_no_linux_one_keeps_the_chosen_mode_unless_its_top_level_is_malformed(bump):
    map_page(bump.ram, FOUR_LEVEL, 0x1000, 0x400000, 0x200000, e.P | e.US, bump.alloc, table_flags=e.PAGE_TABLE)
    assert paging_mode(bump.ram, 0x1000) == FOUR_LEVEL
    assert paging_mode(bump.ram, 0x1000, la57=True) == FIVE_LEVEL
    bump.ram.write_entry(0x1000 + 8 * 300, 0x20_0000 | e.P | e.PS)
    with pytest.raises(InputError, match="slots 300\\) set PS, reserved in a PML4E: not a 4-level table"):
        paging_mode(bump.ram, 0x1000)
