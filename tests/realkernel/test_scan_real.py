"""ptilab scan on real boots: every task's PGD found from the kernel half alone,
and a kernel mapping planted into one process's user PGD flagged for that process only."""

import shutil

import numpy as np
import pytest

from ptilab.audit import Severity, audit
from ptilab.audit.sources import views_from_image
from ptilab.paging import entry as e
from ptilab.scan import scan_image
from ptilab.scan.spaces import KERNEL_ONLY, NO_ISOLATION, PTI_PAIR
from tests.realkernel.conftest import real_kernel

START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000
_scans: dict = {}


def _scan(k):
    if k.config not in _scans:
        _scans[k.config] = scan_image(str(k.path / "core.elf"))
    return _scans[k.config]


def _tasks(k) -> list[tuple[int, str, int]]:
    """tasks.txt: "pid comm pgd_phys_hex" per task with an mm, where the fixture has it."""
    path = k.path / "tasks.txt"
    if not path.exists():
        return []
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [(int(pid), comm, int(pgd, 16)) for pid, comm, pgd in rows]


def test_every_cpus_page_tables_are_found(any_kernel):
    k = any_kernel
    found = {s.kernel_pgd: s for s in _scan(k).spaces}
    for cpu in k.meta["cpus"]:
        pgd = cpu["cr3"] & 0x000F_FFFF_FFFF_E000 if k.meta["pti"] else cpu["cr3"] & 0x000F_FFFF_FFFF_F000
        assert pgd in found, f"CPU {cpu['index']}'s PGD {pgd:#x} not found"
        if cpu["cpl"] == 3:  # a process was running: it has user mappings
            assert found[pgd].kind == (PTI_PAIR if k.meta["pti"] else NO_ISOLATION)
            if k.meta["pti"]:
                assert found[pgd].user_pgd == pgd + 0x1000


def test_every_task_with_an_mm_is_found(any_kernel):
    k = any_kernel
    tasks = _tasks(k)
    if not tasks:
        if "oracle" in k.meta:  # a fixture from the builder that writes tasks.txt: it must be there
            pytest.fail(f"{k.config}: tasks.txt is missing or empty")
        pytest.skip(f"{k.config} predates tasks.txt (the fixture builder writes it since it has the oracle)")
    found = {s.kernel_pgd: s for s in _scan(k).spaces}
    live = PTI_PAIR if k.meta["pti"] else NO_ISOLATION
    for pid, comm, pgd in tasks:
        assert pgd in found, f"pid {pid} ({comm}): PGD {pgd:#x} not found"
        if found[pgd].kind != live:
            # Listed, then gone before the dump (the `cat` that printed the list): exit_mmap()
            # cleared its user half, so no user code can run on it any more.
            assert found[pgd].kind == KERNEL_ONLY, (pid, comm)
            user_half = k.mem.read_frame((found[pgd].user_pgd or pgd) >> e.PAGE_SHIFT)[:256]
            assert not (user_half & np.uint64(e.P)).any(), (pid, comm)
    assert sum(found[pgd].kind == live for _, _, pgd in tasks) >= len(tasks) - 1
    oracle = k.path / "oracle_task.txt"
    if oracle.exists():  # the task the oracle dumped was stopped, alive, just before the freeze
        pgd = int(oracle.read_text().split()[2], 16)
        assert found[pgd].kind == live


def test_init_mm_and_the_trampoline_are_kernel_only_roots(any_kernel):
    from ptilab.memory.vmcoreinfo import parse_vmcoreinfo

    k = any_kernel
    spaces = {s.kernel_pgd: s for s in _scan(k).spaces}
    trampoline = [s for pgd, s in spaces.items() if pgd < 1 << 20]
    assert [s.kind for s in trampoline] == [KERNEL_ONLY]  # trampoline_pgd, in the real-mode area
    if k.mem.vmcoreinfo_text:
        init = parse_vmcoreinfo(k.mem.vmcoreinfo_text).kernel_pgd  # init_top_pgt, wherever KASLR put it
    elif not k.meta["kaslr"]:  # phys_base is 0: init_top_pgt lies at its symbol minus __START_KERNEL_map
        init = k.symbols["init_top_pgt"] - START_KERNEL_MAP
    else:
        return
    assert spaces[init].kind == KERNEL_ONLY
    assert (spaces[init].user_pgd is not None) == k.meta["pti"]


def _roots(result):
    return [(s.kernel_pgd, s.user_pgd, s.kind, s.verdict) for s in result.spaces]


def test_a_kdump_vmcore_without_cpu_notes_gives_the_same_roots_from_vmcoreinfo():
    k = real_kernel("pti-kaslr")
    kdump = k.path / "kdump.elf"
    if not kdump.exists():
        pytest.skip("pti-kaslr predates kdump.elf")
    result = scan_image(str(kdump))
    assert result.reference.source.startswith("VMCOREINFO init_top_pgt")
    assert _roots(result) == _roots(_scan(k))


def test_a_raw_image_without_notes_finds_the_kernel_half_by_census(tmp_path):
    """No CPU, no VMCOREINFO: the kernel half most frames share is init_mm's."""
    k = real_kernel("pti-4level")
    raw = tmp_path / "mem.raw"
    with open(raw, "wb") as f:
        for first, count, _ in k.mem.file_runs():
            f.seek(first << e.PAGE_SHIFT)
            f.write(k.mem.read_frames(np.arange(first, first + count, dtype=np.uint64)).tobytes())
    result = scan_image(str(raw))
    assert "frames share" in result.reference.source and result.reference.pti
    assert _roots(result) == _roots(_scan(k))


def test_every_process_gets_the_verdict_the_cpus_audit_gives(any_kernel):
    """The scan audits each mm as `ptilab audit` audits the one on a CPU."""
    k = any_kernel
    found = views_from_image(k.mem, k.cpu()["cr3"], k.geometry)
    expected = sorted((f.id, f.severity) for f in audit(found.views))
    result = _scan(k)
    processes = [s for s in result.spaces if s.kind != KERNEL_ONLY]
    assert len(processes) >= 2
    for s in processes:
        assert sorted((f.id, f.severity) for f in s.findings) == expected, hex(s.kernel_pgd)
    assert not result.rejected


def _file_offset(core, pa: int) -> int:
    pfn = pa >> e.PAGE_SHIFT
    for first, count, offset in core.file_runs():
        if first <= pfn < first + count:
            return offset + (pfn - first) * e.PAGE_SIZE + (pa & (e.PAGE_SIZE - 1))
    raise AssertionError(f"{pa:#x} not in the file")


def test_a_kernel_mapping_planted_in_one_user_pgd_flags_that_process_only(pti_kernel, tmp_path):
    k = pti_kernel
    before = _scan(k)
    on_cpu = {c["cr3"] & 0x000F_FFFF_FFFF_E000 for c in k.meta["cpus"]}
    victim = next(s for s in before.spaces if s.kind == PTI_PAIR and s.kernel_pgd not in on_cpu)
    kpgd = k.mem.read_frame(victim.kernel_pgd >> e.PAGE_SHIFT)
    upgd = k.mem.read_frame(victim.user_pgd >> e.PAGE_SHIFT)
    present = lambda t: {int(s) for s in np.flatnonzero(t[256:] & np.uint64(e.P)) + 256}
    # A kernel-half slot the kernel PGD maps and the user PGD must not (vmalloc: kernel stacks),
    # copied into this one process's user PGD, as a PTI bypass in one mm would.
    slot = min(present(kpgd) - present(upgd) - {272})
    copy = tmp_path / "planted.elf"
    shutil.copyfile(k.path / "core.elf", copy)
    with open(copy, "r+b") as f:
        f.seek(_file_offset(k.mem, victim.user_pgd + slot * 8))
        f.write(int(kpgd[slot]).to_bytes(8, "little"))
    after = scan_image(str(copy))
    assert [s.kernel_pgd for s in after.spaces] == [s.kernel_pgd for s in before.spaces]
    old = {s.kernel_pgd: s.verdict for s in before.spaces}
    changed = {s.kernel_pgd for s in after.spaces if s.verdict != old[s.kernel_pgd]}
    assert changed == {victim.kernel_pgd}
    planted = next(s for s in after.spaces if s.kernel_pgd == victim.kernel_pgd)
    assert planted.worst >= Severity.HIGH
    assert planted.user_view.get("other kernel", 0) > 0
