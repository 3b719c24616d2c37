"""ptilab scan on real boots: every task's PGD found from the kernel half alone,
and a kernel mapping planted into one process's user PGD flagged for that process only."""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from ptilab.audit import Severity, audit
from ptilab.audit.sources import views_from_image
from ptilab.memory.images import open_image
from ptilab.paging import entry as e
from ptilab.scan import roots, scan_image
from ptilab.scan.spaces import KERNEL_ONLY, NO_ISOLATION, PTI_PAIR
from tests.realkernel.conftest import DUMP_CONFIGS, LIME_CONFIGS, real_kernel

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
    k = any_kernel
    spaces = {s.kernel_pgd: s for s in _scan(k).spaces}
    trampoline = [s for pgd, s in spaces.items() if pgd < 1 << 20]
    assert [s.kind for s in trampoline] == [KERNEL_ONLY]  # trampoline_pgd, in the real-mode area
    if k.mem.vmcoreinfo_text:
        init = k.mem.vmcoreinfo.kernel_pgd  # init_top_pgt, wherever KASLR put it
    elif not k.meta["kaslr"]:  # phys_base is 0: init_top_pgt lies at its symbol minus __START_KERNEL_map
        init = k.symbols["init_top_pgt"] - START_KERNEL_MAP
    else:
        return
    assert spaces[init].kind == KERNEL_ONLY
    assert (spaces[init].user_pgd is not None) == k.meta["pti"]


def _roots(spaces):
    return [(s.kernel_pgd, s.user_pgd, s.kind, s.verdict) for s in spaces]


def _dump_file(config: str, name: str):
    """A file of the config's boot in a format users hold (build.py writes them all
    for the DUMP_CONFIGS): missing is a failure in CI, a skip elsewhere."""
    k = real_kernel(config)
    path = k.path / name
    if not path.exists():
        reason = f"{config} has no {name} (an older fixture, or this machine could not make it)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return k, path


@pytest.mark.parametrize("config", DUMP_CONFIGS)
def test_a_kdump_vmcore_without_cpu_notes_gives_the_same_roots_from_vmcoreinfo(config):
    k, kdump = _dump_file(config, "kdump.elf")
    result = scan_image(str(kdump))
    assert result.reference.source.startswith("VMCOREINFO init_top_pgt")
    assert _roots(result.spaces) == _roots(_scan(k).spaces)


@pytest.mark.parametrize("config", DUMP_CONFIGS)
@pytest.mark.parametrize("name", ["kdump-zlib.dump", "makedumpfile-zlib.dump", "makedumpfile-lzo.dump"])
def test_a_compressed_kdump_gives_the_cores_roots_that_it_holds(config, name):
    """QEMU's -z dump holds every frame (and the CPUs' notes): the core's roots.
    makedumpfile -d 31 leaves out free pages, and with them the PGDs of mm's
    already torn down: every other root of the core is found, live processes all.
    A torn-down pair's first page may live on, reused, while its twin is free
    (seen on 7.2): the dump then has the root without its user PGD."""
    k, path = _dump_file(config, name)
    dump = open_image(path)
    result = scan_image(str(path))
    assert result.reference.source.startswith("CPU " if name.startswith("kdump") else "VMCOREINFO init_top_pgt")
    core = _scan(k)
    has = lambda pgd: bool(dump.frames_present(np.array([pgd >> e.PAGE_SHIFT], np.uint64))[0])
    held = [s for s in core.spaces if has(s.kernel_pgd)]
    found = {s.kernel_pgd: s for s in result.spaces}
    assert sorted(found) == sorted(s.kernel_pgd for s in held)
    whole = [s for s in held if s.user_pgd is None or has(s.user_pgd)]
    assert _roots([found[s.kernel_pgd] for s in whole]) == _roots(whole)
    assert all(found[s.kernel_pgd].user_pgd is None for s in held if s not in whole)
    live = [s.kernel_pgd for s in core.spaces if s.kind != KERNEL_ONLY]  # PTI pairs, or single PGDs with PTI off
    assert len(live) >= 4 and set(live) <= {s.kernel_pgd for s in held}
    if name.startswith("kdump"):
        assert held == core.spaces


@pytest.mark.parametrize("config", LIME_CONFIGS)
def test_a_lime_dump_finds_its_roots_at_their_physical_addresses(config):
    """LiME saves System RAM ranges (a gap below 1 MiB, the first page left out)
    with no CPU state and no VMCOREINFO note, at boot: an earlier moment of the
    same boot as core.elf. The reference is init_top_pgt's kernel half, from the
    VMCOREINFO the kernel keeps in RAM, and the census agrees with it; init
    (pid 1, alive since before LiME ran), init_mm and the trampoline are roots at
    the physical addresses the core gives them; and every PGD pair whose frames
    are the same bytes in both dumps is a root in both, of the same kind."""
    k, path = _dump_file(config, "lime.dump")
    lime = open_image(path)
    assert len(lime.segments) >= 2 and lime.segments[0][0] > 0
    result = scan_image(str(path))
    init_mm = k.mem.vmcoreinfo.kernel_pgd
    assert result.reference.source == (f"VMCOREINFO init_top_pgt (pa {init_mm:#x}, VMCOREINFO found in memory "
                                       f"at pa {lime.vmcoreinfo.found_at:#x})") and result.reference.pti
    assert np.array_equal(result.reference.kernel_half & ~roots.IGNORED,
                          k.mem.read_frame(init_mm >> e.PAGE_SHIFT)[roots.HALF:] & ~roots.IGNORED)
    counts = Counter()
    for chunk in roots.chunks(lime, str(path)):
        counts.update(roots.census_chunk(chunk))
    census, _ = roots.reference_half(counts, lime)
    assert np.array_equal(census & ~roots.IGNORED, result.reference.kernel_half & ~roots.IGNORED)
    spaces = {s.kernel_pgd: s for s in result.spaces}
    assert spaces[init_mm].kind == KERNEL_ONLY and spaces[init_mm].user_pgd == init_mm + e.PAGE_SIZE
    assert [s.kind for pgd, s in spaces.items() if pgd < 1 << 20] == [KERNEL_ONLY]  # trampoline_pgd
    init = next(pgd for pid, _, pgd in _tasks(k) if pid == 1)
    assert spaces[init].kind == PTI_PAIR
    core = {s.kernel_pgd: s for s in _scan(k).spaces}

    def unchanged(pgd: int) -> bool:
        pfns = np.array([pgd >> e.PAGE_SHIFT, (pgd >> e.PAGE_SHIFT) + 1], np.uint64)
        return bool(lime.frames_present(pfns).all()) and np.array_equal(lime.read_frames(pfns), k.mem.read_frames(pfns))

    same = {pgd for pgd in spaces.keys() | core.keys() if unchanged(pgd)}
    assert {init_mm, init} <= same
    assert {pgd: spaces[pgd].kind for pgd in same} == {pgd: core[pgd].kind for pgd in same}


@pytest.mark.parametrize("config", DUMP_CONFIGS)
def test_many_images_audit_a_kdump_vmcore_as_the_single_image_audit_does(config, tmp_path):
    """The many-image audit picks each image's CR3 the way `ptilab audit IMAGE`
    does (linux.paging_mode.image_root): a vmcore without CPU notes by VMCOREINFO."""
    from ptilab.scan.batch import audit_images

    k, kdump = _dump_file(config, "kdump.elf")
    rows = audit_images([str(k.path / "core.elf"), str(kdump)], None, None, None, workers=0)
    init_mm = k.mem.vmcoreinfo.kernel_pgd
    assert rows[1].cr3 == init_mm
    assert rows[0].cr3 == k.cpu()["cr3"]
    single = json.loads(subprocess.run([sys.executable, "-m", "ptilab.cli", "audit", "--json", str(kdump)],
                                       capture_output=True, text=True).stdout)
    assert rows[1].as_dict()["findings"] == single["findings"]
    assert rows[1].as_dict()["machine"] == single["machine"]


def test_a_raw_image_without_notes_finds_the_kernel_half_by_census(tmp_path):
    """No CPU, no VMCOREINFO (the kernel's copies in RAM wiped too): the kernel half most frames share is init_mm's."""
    from ptilab.memory.vmcoreinfo import candidate_texts

    k = real_kernel("pti-4level")
    raw = tmp_path / "mem.raw"
    with open(raw, "wb") as f:
        for first, count, _ in k.mem.file_runs():
            f.seek(first << e.PAGE_SHIFT)
            f.write(k.mem.read_frames(np.arange(first, first + count, dtype=np.uint64)).tobytes())
        for pa, _ in candidate_texts(k.mem):
            f.seek(pa & ~(e.PAGE_SIZE - 1))
            f.write(bytes(e.PAGE_SIZE))
    assert open_image(raw).vmcoreinfo is None
    result = scan_image(str(raw))
    assert "frames share" in result.reference.source and result.reference.pti
    # Without the kernel's log nothing says KASLR is off (the core's log does): the same roots, and each
    # PTI pair warned of EntryBleed "if KASLR is on" where the core's says KASLR-OFF instead.
    assert result.exposure.kaslr is None and _scan(k).exposure.kaslr is False
    plain = lambda spaces: [(s.kernel_pgd, s.user_pgd, s.kind) for s in spaces]  # noqa: E731
    assert plain(result.spaces) == plain(_scan(k).spaces)
    for space in result.spaces:
        if space.kind == "PTI pair":
            assert space.verdict == "medium: KASLR-ENTRYBLEED"


def test_every_process_gets_the_verdict_the_cpus_audit_gives(any_kernel):
    """The scan audits each mm as `ptilab audit` audits the one on a CPU."""
    k = any_kernel
    found = views_from_image(k.mem, k.cpu()["cr3"], k.geometry)
    from ptilab.audit.image import audit_image

    expected = sorted((f.id, f.severity) for f in audit_image(
        any_kernel.mem, "core.elf", any_kernel.cpu()["cr3"], any_kernel.geometry).findings)
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
