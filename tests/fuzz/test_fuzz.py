"""Fuzzing on every CI run, with a small budget: mutated cores, mutated real
page tables, mutated monitor and ptdump text. Only ptilab's own errors may
come out. bench/fuzz_long.py runs the same targets for as long as asked."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptilab.memory.simulated import SimulatedRAM
from ptilab.paging import Geometry, walk
from ptilab.paging import entry as e
from tests.fuzz import targets

# Derandomized: CI runs the same inputs every time, so a red run is a change
# in the code, never a lucky draw; bench/fuzz_long.py draws fresh inputs.
CI = settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def needs_fixture():
    """The real tables the mutations start from: built on demand, so the first
    run collects and runs what the next does (skipped where it cannot be built)."""
    from tests.realkernel.conftest import real_kernel
    real_kernel("pti-4level")


@CI
@given(targets.mutated_cores())
def test_a_mutated_core_opens_or_is_refused(data):
    targets.fuzz_core(data)


@CI
@given(targets.mutated_kcores())
def test_a_mutated_kcore_opens_or_is_refused(data):
    targets.fuzz_kcore(data)


def test_the_small_kcore_is_valid():
    """The seed of the kcore mutations walks from its VMCOREINFO: else the fuzzing exercises only refusals."""
    import os
    import tempfile

    from ptilab.memory.kcore import Kcore

    fd, path = tempfile.mkstemp()
    os.write(fd, targets.small_kcore())
    os.close(fd)
    try:
        with Kcore(path) as kc:
            info = kc.vmcoreinfo
            w = walk(kc, info.kernel_pgd, Geometry(info.levels))
            assert info.kernel_pgd == 0x1000 and w.mapped_bytes() > 0
    finally:
        os.unlink(path)


@pytest.mark.usefixtures("needs_fixture")
@CI
@given(targets.table_mutations())
def test_real_tables_with_mutated_entries_walk_or_are_refused(mutation):
    targets.fuzz_walk(*mutation)


@pytest.mark.usefixtures("needs_fixture")
@CI
@given(targets.mutated_texts())
def test_mutated_monitor_and_ptdump_text_parses_or_is_refused(kind_and_text):
    targets.fuzz_text(*kind_and_text)


@CI
@given(targets.raw_images())
def test_a_raw_image_of_any_bytes_walks_or_is_refused(image):
    targets.fuzz_raw(*image)


@pytest.mark.usefixtures("needs_fixture")
@CI
@given(targets.mutated_files())
def test_a_text_file_with_any_bytes_parses_or_is_refused_in_one_line(reader_and_data):
    targets.fuzz_file(*reader_and_data)


@settings(CI, max_examples=60)
@given(targets.mutated_workloads())
def test_a_mutated_workload_loads_and_plays_or_is_refused(data):
    targets.fuzz_workload(data)


@CI
@given(targets.vmcoreinfo_texts())
def test_vmcoreinfo_text_parses_or_is_refused(data):
    targets.fuzz_vmcoreinfo(data)


@CI
@given(targets.ring_mutations())
def test_a_hostile_printk_ring_reads_or_is_refused_in_one_line(mutation):
    targets.fuzz_ring(mutation)


def test_the_small_ring_is_valid():
    """The seed of the ring mutations reads: else the fuzzing exercises only refusals."""
    from ptilab.linux.printk import read_ring
    from ptilab.memory.vmcoreinfo import parse_vmcoreinfo
    from tests.linux.printk_ring import Message, build_ring

    ring = build_ring([Message(b"message %d" % i) for i in range(40)])
    assert len(read_ring(ring.ram, parse_vmcoreinfo(ring.vmcoreinfo)).records) == len(ring.survivors) > 5


@settings(CI, max_examples=60)
@given(targets.vmcoreinfo_pages())
def test_hostile_pages_never_pass_for_the_kernels_vmcoreinfo(value):
    targets.fuzz_vmcoreinfo_pages(value)


@CI
@given(targets.kernel_files())
def test_a_mutated_kernel_image_or_package_boots_or_is_refused_and_writes_only_where_asked(data):
    targets.fuzz_kernel_image(data)


def test_the_small_kernel_image_and_package_are_valid(tmp_path):
    """The seeds of the kernel_image mutations are a kernel: else the fuzzing exercises only refusals."""
    from ptilab.guest.image import kernel_image

    for name, data in [("bzImage", targets.small_bzimage()), ("k.deb", targets.small_deb())]:
        image = kernel_image(_write(tmp_path / name, data), tmp_path / "unpack")
        assert image.release == "9.9.9-fuzz"


CORPUS = sorted((Path(__file__).parent / "corpus").glob("*.txt"))


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_the_kept_corpus_still_passes(path, request):
    """Inputs bench/fuzz_long.py drew and kept (Python literals), replayed on every run."""
    import ast

    name = path.stem.rsplit("-", 1)[0]
    if name in targets.NEED_FIXTURE:
        request.getfixturevalue("needs_fixture")
    _, target = targets.TARGETS[name]
    target(ast.literal_eval(path.read_text()))


def test_every_reader_has_a_fuzz_target():
    assert {"core", "raw", "walk", "text", "file", "workload", "vmcoreinfo", "ring", "vmcoreinfo_pages", "kernel_image"} <= set(targets.TARGETS)
    assert set(targets.FILE_READERS) == {"ptdump", "info_mem", "info_tlb", "kallsyms"}


@pytest.mark.parametrize("phoff", [1 << 63, (1 << 64) - 1])
def test_a_core_whose_program_headers_lie_past_2_63_is_refused(phoff):
    """Found by bench/fuzz_long.py: pyelftools' seek overflowed into a ValueError."""
    import struct

    data = bytearray(targets.small_core())
    struct.pack_into("<Q", data, targets.HEADER_FIELDS["e_phoff"][0], phoff)
    targets.fuzz_core(bytes(data))


def test_the_small_core_is_valid():
    """The seed of the core mutations walks: else the fuzzing exercises only refusals."""
    import os
    import tempfile

    from ptilab.memory.elfcore import ElfCore
    from ptilab.paging import Geometry, walk

    fd, path = tempfile.mkstemp(suffix=".elf")
    with os.fdopen(fd, "wb") as f:
        f.write(targets.small_core())
    try:
        with ElfCore(path) as core:
            w = walk(core, core.cpus[0].cr3_register, Geometry(4))
            # pgd 0 and 511 share the pud, whose slots 0 and 510 share the pmd: 8 pages + one 2 MiB page, 4 times.
            assert w.mapped_bytes() == 4 * (8 * 4096 + (2 << 20))
            assert len(core.cpus) == 2
    finally:
        os.unlink(path)


@st.composite
def shortcut_trees(draw):
    """A 4-level tree built to hit the walker's shortcuts: PTE tables that are
    contiguous runs (some with one entry spoiled), PMD tables of contiguous
    2 MiB leaves, and PMD entries aliasing a few PTE tables with varied rights."""
    ram = SimulatedRAM(1 << 30)
    pgd, pud, pmds, ptes = 0x1000, 0x2000, [0x3000, 0x4000], [0x10000 + i * 0x1000 for i in range(6)]
    ram.write_entries(pgd, np.array([pud | 0x67, pud | 0x63 | e.NX], np.uint64))
    ram.write_entries(pud, np.array([pmds[0] | 0x67, pmds[1] | 0x63, pmds[1] | 0x67], np.uint64))
    for i, pt in enumerate(ptes):
        flags = draw(st.sampled_from([0x63, 0x67, 0x163 | e.NX, 0x25, 0xE3]))
        base = draw(st.integers(0, 0x3FFF)) << 12
        rows = (np.uint64(base) + (np.arange(512, dtype=np.uint64) << np.uint64(12))) | np.uint64(flags)
        for _ in range(draw(st.integers(0, 2))):
            at = draw(st.integers(0, 511))
            how = draw(st.sampled_from(["flag", "address", "clear", "reserved"]))
            rows[at] = {"flag": rows[at] ^ np.uint64(e.RW), "address": rows[at] + np.uint64(0x1000),
                        "clear": np.uint64(0), "reserved": rows[at] | np.uint64(1 << 51)}[how]
        ram.write_entries(pt, rows)
    # PMD 0: many entries pointing at the few PTE tables (aliases), with varied rights.
    picks = draw(st.lists(st.tuples(st.integers(0, 5), st.sampled_from([0x63, 0x67, 0x65, 0x67 | e.NX])),
                          min_size=32, max_size=512))  # reached twice: >= 64 rows, enough to share
    ram.write_entries(pmds[0], np.array([ptes[i] | f for i, f in picks], np.uint64))
    # PMD 1: contiguous 2 MiB leaves, maybe spoiled.
    flags = draw(st.sampled_from([0xE3, 0x1E3 | e.NX, 0xA1, 0x10E3]))
    big = (np.uint64(draw(st.integers(0, 7)) << 30) + (np.arange(512, dtype=np.uint64) << np.uint64(21))) | \
        np.uint64(flags)
    if draw(st.booleans()):
        big[draw(st.integers(0, 511))] ^= np.uint64(draw(st.sampled_from([e.P, e.RW, 1 << 13, 1 << 21])))
    ram.write_entries(pmds[1], big)
    return ram, pgd


@CI
@given(shortcut_trees())
def test_the_walk_shortcuts_change_no_answer(tree):
    """Contiguous-run tables and summarised (table, rights) aliases are
    shortcuts: with both turned off the walk must give the very same ranges,
    reference counts and anomalies once its aliases are expanded."""
    ram, pgd = tree
    fast = walk(ram, pgd, Geometry(4))
    walk_module = sys.modules["ptilab.paging.walk"]
    with mock.patch.object(walk_module, "_run_tables", lambda data, *a: np.zeros(len(data), bool)):
        slow = walk(ram, pgd, Geometry(4), _summarise=False)
    assert fast.ranges.tobytes() == slow.ranges.tobytes()
    assert [r.tolist() for r in fast.table_refs] == [r.tolist() for r in slow.table_refs]
    assert [(a.kind, a.count, a.frames) for a in fast.anomalies] == [(a.kind, a.count, a.frames) for a in slow.anomalies]


@CI
@given(targets.mutated_kdumps())
def test_a_mutated_kdump_file_opens_or_is_refused(data):
    targets.fuzz_dump(data)


@CI
@given(targets.mutated_limes())
def test_a_mutated_lime_file_opens_or_is_refused(data):
    targets.fuzz_dump(data)


def test_the_small_kdump_and_lime_files_are_valid(tmp_path):
    """The seeds of the kdump and LiME mutations read as the small core: else the fuzzing exercises only refusals."""
    from ptilab.memory.images import open_image

    want = walk(open_image(_write(tmp_path / "c.elf", targets.small_core())), 0x1000, Geometry(4))
    for name, data in [("k.kdump", targets.small_kdump("lzo")), ("l.lime", targets.small_lime())]:
        got = walk(open_image(_write(tmp_path / name, data)), 0x1000, Geometry(4))
        assert got.ranges.tobytes() == want.ranges.tobytes() and w_nonempty(got)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def w_nonempty(w) -> bool:
    return w.mapped_bytes() > 0
