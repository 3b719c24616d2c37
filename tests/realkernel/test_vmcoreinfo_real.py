"""VMCOREINFO as the real kernel wrote it (QEMU's vmcoreinfo device, the guest's qemu_fw_cfg driver)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from ptilab.memory.elfcore import ElfCore
from ptilab.memory.images import open_image
from ptilab.memory.vmcoreinfo import START_KERNEL_MAP
from tests.realkernel.conftest import DUMP_CONFIGS, LIME_CONFIGS, raw_image, real_kernel

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


# -- VMCOREINFO found in RAM, for dumps without the note -----------------------


@pytest.fixture(scope="module", params=["pti-kaslr", "pti-5level"])
def raw_of_core(request, tmp_path_factory):
    k = real_kernel(request.param)
    return k, raw_image(k, tmp_path_factory.mktemp(request.param) / "mem.raw")


def _found_equals_the_note(found, k) -> None:
    note = k.mem.vmcoreinfo
    assert found is not None and found.found_at is not None and note.found_at is None
    assert found.entries == note.entries and found.kernel_pgd == note.kernel_pgd and found.levels == note.levels
    # What lies at found_at in the core is the note's text, byte for byte: the kernel's own copy.
    text = k.mem.vmcoreinfo_text.rstrip("\0").encode()
    assert k.mem.read(found.found_at, len(text)) == text


@pytest.mark.parametrize("config", LIME_CONFIGS)
def test_a_lime_dump_yields_the_vmcoreinfo_the_same_boots_core_carries(config):
    k = real_kernel(config)
    lime = open_image(k.path / "lime.dump")
    assert lime.vmcoreinfo_text == ""
    _found_equals_the_note(lime.vmcoreinfo, k)


def test_a_raw_image_yields_the_cores_vmcoreinfo(raw_of_core):
    k, raw = raw_of_core
    _found_equals_the_note(open_image(raw).vmcoreinfo, k)


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ptilab.cli", *map(str, args)], capture_output=True, text=True)


def _without_cr3_as_the_core_with_init_mm(k, image, command: list) -> None:
    init_mm = f"{k.mem.vmcoreinfo.kernel_pgd:x}"
    got = _cli(command[0], image, *command[1:])
    want = _cli(command[0], k.path / "core.elf", "--cr3", init_mm, *command[1:])
    assert got.returncode == want.returncode and got.returncode in (0, 1), got.stderr
    assert got.stdout.replace(str(image), "IMAGE") == want.stdout.replace(str(k.path / "core.elf"), "IMAGE")
    assert len(got.stdout) > 200


def test_dump_and_meltdown_of_a_raw_image_need_no_cr3(raw_of_core):
    k, raw = raw_of_core
    for command in (["dump"], ["meltdown", "--system-map", k.path / "kallsyms.txt"]):
        _without_cr3_as_the_core_with_init_mm(k, raw, command)


@pytest.mark.parametrize("config", LIME_CONFIGS)
def test_meltdown_of_a_lime_dump_needs_no_cr3(config):
    # LiME ran earlier in the boot than the core was taken, so the direct map's
    # pages differ (dump); the cpu_entry_area and the IDT meltdown reads do not.
    k = real_kernel(config)
    _without_cr3_as_the_core_with_init_mm(k, k.path / "lime.dump", ["meltdown", "--system-map", k.path / "kallsyms.txt"])


def test_audit_of_a_raw_image_needs_no_cr3_and_says_where_vmcoreinfo_came_from(raw_of_core):
    k, raw = raw_of_core
    init_mm = k.mem.vmcoreinfo.kernel_pgd
    got, want = _audit_json(raw), _audit_json(k.path / "core.elf", "--cr3", f"{init_mm:x}")
    for key in ("pti_pair", "findings", "user_view"):
        assert got[key] == want[key], key
    found = open_image(raw).vmcoreinfo
    assert got["vmcoreinfo"] == {**want["vmcoreinfo"], "prstatus_cpus": 0, "source": "memory",
                                 "found_at": f"{found.found_at:#x}"}
    text = _cli("audit", raw).stdout
    assert f"VMCOREINFO (found in memory at pa {found.found_at:#x}): {k.meta['kernel_release']}" in text


def test_scan_of_a_raw_image_takes_its_reference_from_the_vmcoreinfo_in_ram(raw_of_core):
    from ptilab.scan import scan_image

    k, raw = raw_of_core
    result = scan_image(str(raw))
    assert result.reference.source.startswith(f"VMCOREINFO init_top_pgt (pa {k.mem.vmcoreinfo.kernel_pgd:#x}, "
                                              f"VMCOREINFO found in memory at pa 0x")
    core = scan_image(str(k.path / "core.elf"))
    assert [(s.kernel_pgd, s.user_pgd, s.kind, s.verdict) for s in result.spaces] == \
        [(s.kernel_pgd, s.user_pgd, s.kind, s.verdict) for s in core.spaces]


def test_an_image_without_any_vmcoreinfo_is_refused_saying_where_init_top_pgt_is(tmp_path):
    k = real_kernel("pti-kaslr")
    raw = raw_image(k, tmp_path / "mem.raw")
    found = open_image(raw).vmcoreinfo
    with open(raw, "r+b") as f:  # wipe both of the kernel's copies
        for pa in (found.found_at & ~0xFFF, *_other_copies(k, found)):
            f.seek(pa)
            f.write(bytes(4096))
    done = _cli("audit", raw)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "no VMCOREINFO (no note, none found in its memory): give --cr3" in done.stderr
    assert "init_top_pgt as the same boot's other dumps print it" in done.stderr
    assert "System.map's init_top_pgt - 0xffffffff80000000 (__START_KERNEL_map) + phys_base" in done.stderr


def _other_copies(k, found) -> list[int]:
    from ptilab.memory.vmcoreinfo import candidate_texts

    return [pa & ~0xFFF for pa, _ in candidate_texts(k.mem) if pa != found.found_at]
