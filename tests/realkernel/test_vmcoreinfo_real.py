"""VMCOREINFO as the real kernel wrote it (QEMU's vmcoreinfo device, the guest's qemu_fw_cfg driver)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from ptilab.memory.elfcore import ElfCore
from ptilab.memory.vmcoreinfo import START_KERNEL_MAP
from tests.realkernel.conftest import DUMP_CONFIGS, real_kernel

TEXT_START = 0xFFFFFFFF81000000  # __START_KERNEL without KASLR: _stext of an unslid x86-64 kernel


def test_every_fixture_core_carries_the_kernels_vmcoreinfo(any_kernel):
    info = any_kernel.mem.vmcoreinfo
    assert info.osrelease == any_kernel.meta["kernel_release"]
    assert info.levels == any_kernel.geometry.levels
    assert info.symbols["_stext"] == any_kernel.symbols["_stext"]
    assert info.symbols["init_top_pgt"] == any_kernel.symbols["init_top_pgt"]
    assert info.kernel_offset == any_kernel.symbols["_stext"] - TEXT_START
    assert (info.kernel_offset != 0) == any_kernel.meta["kaslr"]
    assert any_kernel.mem.prstatus_cpus == len(any_kernel.meta["cpus"])


def test_init_top_pgt_holds_the_kernel_half_every_process_pgd_copies(any_kernel):
    # pgd_ctor() clones swapper_pg_dir's kernel half into each new mm's PGD:
    # the pair VMCOREINFO names must agree with the PGD the user-mode CPU runs on.
    info = any_kernel.mem.vmcoreinfo
    assert info.pa_symbol(info.symbols["init_top_pgt"]) == info.kernel_pgd
    assert START_KERNEL_MAP < info.symbols["init_top_pgt"]
    process_kernel_pgd = any_kernel.cpu()["cr3"] & ~0x1FFF & ((1 << 52) - 1)
    swapper = any_kernel.mem.read_frame(info.kernel_pgd >> 12)
    process = any_kernel.mem.read_frame(process_kernel_pgd >> 12)
    ignored = np.uint64(0x20)  # the accessed bit is set by whichever walk went through
    assert np.array_equal(swapper[256:] & ~ignored, process[256:] & ~ignored)


def _audit_json(*args) -> dict:
    done = subprocess.run([sys.executable, "-m", "ptilab.cli", "audit", "--json", *map(str, args)],
                          capture_output=True, text=True)
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("config", DUMP_CONFIGS)
def test_kdump_shaped_vmcore_is_audited_from_its_vmcoreinfo_alone(config):
    # kdump.elf: core.elf as kdump's /proc/vmcore has it: NT_PRSTATUS and
    # VMCOREINFO notes, no QEMU CPU notes, so no CR3 anywhere in the file.
    k = real_kernel(config)
    vmcore = ElfCore(k.path / "kdump.elf")
    assert vmcore.cpus == () and vmcore.prstatus_cpus == 2
    info = vmcore.vmcoreinfo
    from_note = _audit_json(k.path / "kdump.elf")
    from_cr3 = _audit_json(k.path / "core.elf", "--cr3", f"{info.kernel_pgd:x}")
    assert from_note["pti_pair"] == {"kernel_pgd": f"{info.kernel_pgd:#x}", "user_pgd": f"{info.kernel_pgd + 0x1000:#x}",
                                     "is_pti": True, "reasons": from_cr3["pti_pair"]["reasons"]}
    assert from_note["findings"] == from_cr3["findings"]
    slide = k.symbols["_stext"] - TEXT_START
    assert from_note["vmcoreinfo"] == {"osrelease": k.meta["kernel_release"], "kernel_offset": f"{slide:#x}",
                                       "init_top_pgt": f"{info.kernel_pgd:#x}", "levels": 4, "prstatus_cpus": 2,
                                       "source": "note", "found_at": None}
    assert from_note["user_view"] == from_cr3["user_view"]
    # init_mm has no user space: its user view is exactly the kernel's entry pieces of the process's.
    process = _audit_json(k.path / "core.elf")
    kernel_half = lambda view: [r for r in view["ranges"] if int(r["start"], 16) >= 1 << 63]
    assert kernel_half(from_note["user_view"]) == kernel_half(process["user_view"])
