"""The kernel's own ptdump as the oracle.

build.py loads oracle/ptilab_oracle.ko in every boot: it stops one busy-loop
task (SIGSTOP), writes ptdump_walk_pgd_level_debugfs() of that task's user and
kernel PGD (oracle_user.txt, oracle_kernel.txt) and every task's mm->pgd
(tasks.txt), then the host freezes the VM and dumps its memory.  ptilab reads
the core and must print what Linux printed.
"""

from __future__ import annotations

import difflib
import os
import subprocess
import sys

import numpy as np
import pytest

from ptilab.paging.entry import PAGE_SIZE
from ptilab.paging import walk
from tests.realkernel.conftest import REAL_CONFIGS, assert_same_but_accessed_bits, real_kernel

PTI_SWITCH = 0x1000  # PTI_PGTABLE_SWITCH_BIT: the user PGD is the page after the kernel PGD
# Where a live kernel changes its tables between the oracle's ptdump and the freeze.
CHURN_MARKERS = ("---[ vmalloc() Area ]---", "---[ Low Kernel Mapping ]---")


def ptilab_ptdump(k, pgd: int) -> str:
    """`ptilab dump CORE --format ptdump --cr3 PGD`, as a user runs it."""
    cmd = [sys.executable, "-m", "ptilab.cli", "dump", str(k.path / "core.elf"), "--format", "ptdump",
           "--cr3", f"{pgd:x}"] + (["--la57"] if k.meta["la57"] else [])
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, COLUMNS="200"), timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def oracle_kernel(config: str):
    k = real_kernel(config)
    assert k.meta["oracle"], f"{config}: the oracle module did not run: {k.meta.get('oracle_error')}"
    return k


@pytest.mark.parametrize("config", REAL_CONFIGS)
def test_tasks_share_the_kernel_half_of_their_pgds(config):
    """pgd_ctor() copies swapper_pg_dir's kernel entries into every new PGD (and, under PTI, the user
    PGD's kernel entries from swapper's user PGD): every task's top level agrees with the CPU's there."""
    k = oracle_kernel(config)
    tasks = [line.split() for line in (k.path / "tasks.txt").read_text().splitlines()]
    pgds = {int(pgd, 16) for _, _, pgd in tasks}
    assert len(tasks) >= 6 and len(pgds) == len(tasks)  # init, busy loops, sleepers, the target: own mms
    pid, comm, pgd = k.oracle_task()
    assert [str(pid), comm, f"{pgd:x}"] in tasks
    halves = [0, PTI_SWITCH] if k.meta["pti"] else [0]
    cpu_pgd = k.cpu()["cr3"] & ~0xFFF & ~PTI_SWITCH
    for half in halves:
        want = k.mem.read_frame((cpu_pgd + half) // PAGE_SIZE)[256:]
        for pgd in pgds:
            assert np.array_equal(k.mem.read_frame((pgd + half) // PAGE_SIZE)[256:], want)
    assert cpu_pgd in pgds  # the CPU in user mode runs one of the listed tasks


def churning_areas(text: str) -> tuple[list[str], list[str]]:
    """The text split into the lines of the areas in CHURN_MARKERS and all the others."""
    inside, outside, here = [], [], False
    for line in text.splitlines(True):
        if line.startswith("---["):
            here = line.strip() in CHURN_MARKERS
        (inside if here and not line.startswith("---[") else outside).append(line)
    return inside, outside


@pytest.mark.parametrize("config", REAL_CONFIGS)
def test_kernel_pgd_ptdump_equals_the_kernels_own_but_for_live_churn(config):
    """The kernel PGD is shared and live: between the oracle's ptdump and the freeze the guest's
    shell runs a few short processes (cat, tar, gzip), whose vmap'd kernel stacks (16 KiB and a
    guard page) come and go in the vmalloc() area, and a few 4K PTEs of the direct map may
    change flags (seen once on 6.12; most likely the kernel resetting the direct-map aliases of
    the oracle module's init text when do_free_init() frees it from a workqueue after an RCU
    grace period), which splits or joins a few of its lines. Everything else must match byte for byte; in those
    two areas at most a few lines may differ. Elsewhere only the Accessed bit may have changed."""
    k = oracle_kernel(config)
    _, _, pgd = k.oracle_task()
    want_churn, want_rest = churning_areas((k.path / "oracle_kernel.txt").read_text())
    got_churn, got_rest = churning_areas(ptilab_ptdump(k, pgd))
    if got_rest != want_rest:  # the user half shares the task's tables: see test_ptdump_real.py
        assert_same_but_accessed_bits("".join(got_rest), "".join(want_rest), walk(k.mem, pgd, k.geometry))
    changed = [l for l in difflib.ndiff(want_churn, got_churn) if l[:1] in "+-"]
    assert len(want_churn) > 10 and len(changed) <= 24, "".join(changed)
