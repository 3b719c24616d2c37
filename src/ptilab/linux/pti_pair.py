"""Is this CR3 one half of a Linux PTI PGD pair? Judged from the two top-level tables alone.

With PTI every mm has an 8 KiB-aligned pair of PGDs (pgd_alloc() takes an
order-1 page): the kernel PGD at the even 4 KiB, the user PGD at +4096, so the
entry code switches between them by flipping CR3 bit 12. Linux fills them in
a recognisable way:

- user-half slots are written to both, but __pti_set_user_pgtbl() sets NX in
  the kernel copy of every present user-accessible entry, so that returning
  to user mode on the kernel CR3 faults instead of running user code;
- the user PGD's kernel half holds only what entry and exit need
  (pti_clone_user_shared(), pti_clone_entry_text(), the cpu_tss_rw pages):
  on 4-level paging the cpu_entry_area and espfix slots (the same entries as
  the kernel's), the kernel-text slot and the direct-map slot(s) of the TSS
  pages; the kernel PGD's kernel half holds much more.

A kernel booted with pti=off still allocates the pair on a
CONFIG_PAGE_TABLE_ISOLATION build, but leaves the upper page zero.

    >>> pair = find_pti_pair(core, core.cpus[1].cr3, core.cpus[1].geometry)
    >>> pair.is_pti, pair.reasons
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ptilab.linux.profiles import CPU_ENTRY_AREA_BASE, ESPFIX_BASE_ADDR, START_KERNEL_MAP
from ptilab.memory.physical import PhysicalMemory
from ptilab.paging import entry as e
from ptilab.paging.cr3 import CR3
from ptilab.paging.geometry import FOUR_LEVEL, Geometry

HALF = 256  # the top-level index bit that is also the sign bit of the address
# More kernel-half slots than this in a user PGD is not Linux's entry-only
# view: it needs 3 fixed ones plus the direct-map slots of the TSS pages.
MAX_USER_KERNEL_SLOTS = 16
# Hardware sets A in whichever copy it walked through: not a difference Linux made.
IGNORED = e.NX | e.A


@dataclass(frozen=True)
class PtiPair:
    """The PGD pair a CR3 belongs to, and whether it looks like Linux PTI made it.

    kernel_pgd, user_pgd: physical addresses of the two tables.
    is_pti: every check held.
    reasons: the evidence, for and against, one sentence each.
    """

    kernel_pgd: int
    user_pgd: int
    is_pti: bool
    reasons: tuple[str, ...]


def slot_names(geometry: Geometry) -> dict[int, str]:
    """Top-level slots of the kernel regions PTI leaves in the user PGD."""
    names: dict[int, list[str]] = {}
    for va, name in ((CPU_ENTRY_AREA_BASE, "cpu_entry_area"), (ESPFIX_BASE_ADDR, "espfix"),
                     (START_KERNEL_MAP, "kernel text")):
        names.setdefault(geometry.pgd_index(va), []).append(name)
    return {slot: "/".join(n) for slot, n in names.items()}


def _slots(slots: np.ndarray, names: dict[int, str]) -> str:
    return ", ".join(f"{s} ({names[s]})" if s in names else str(s) for s in (int(x) for x in slots))


def find_pti_pair(mem: PhysicalMemory, cr3: CR3 | int, geometry: Geometry = FOUR_LEVEL) -> PtiPair:
    """Find the PGD pair cr3 belongs to (either half will do) and judge it.

    Reads the two top-level frames and nothing else.
    """
    if isinstance(cr3, int):
        cr3 = CR3(cr3)
    kernel_pgd, user_pgd = cr3.kernel().pgd, cr3.user().pgd
    pfns = np.array([kernel_pgd >> e.PAGE_SHIFT, user_pgd >> e.PAGE_SHIFT], dtype=np.uint64)
    present = mem.frames_present(pfns)
    if not present.all():
        missing = [f"{name} PGD {pa:#x}" for name, pa, ok in
                   (("kernel", kernel_pgd, present[0]), ("user", user_pgd, present[1])) if not ok]
        return PtiPair(kernel_pgd, user_pgd, False, (f"{' and '.join(missing)} not in memory",))
    kern, user = mem.read_frames(pfns)
    return PtiPair(kernel_pgd, user_pgd, *_judge(kern, user, cr3, geometry))


def _judge(kern: np.ndarray, user: np.ndarray, cr3: CR3, geometry: Geometry) -> tuple[bool, tuple[str, ...]]:
    """Whether two PGDs are a PTI pair, and the reasons against and for it."""
    names = slot_names(geometry)
    against: list[str] = []
    evidence: list[str] = []
    if cr3.is_user_half_of_pair:
        evidence.append("CR3 selects the upper table of the pair (bit 12 set), as PTI's exit path does")
    _judge_kernel_half(kern, user, names, against, evidence)
    _judge_user_half(kern, user, names, against, evidence)
    return not against, tuple(against + evidence)


def _judge_kernel_half(kern: np.ndarray, user: np.ndarray, names: dict[int, str], against: list[str],
                       evidence: list[str]) -> None:
    """PTI's user PGD maps a few of the kernel PGD's kernel-half slots, some shared, some its own."""
    p = np.uint64(e.P)
    k_kernel = np.flatnonzero(kern[HALF:] & p) + HALF
    u_kernel = np.flatnonzero(user[HALF:] & p) + HALF
    if len(u_kernel) == 0:
        against.append("user PGD maps nothing of the kernel half, so no entry path could run on it"
                       + (" (it is all zero, as pti=off leaves it)" if not user.any() else ""))
        return
    extra = np.setdiff1d(u_kernel, k_kernel)
    if len(extra):
        against.append(f"user PGD maps kernel-half slots the kernel PGD lacks: {_slots(extra, names)}")
    no_a = ~np.uint64(e.A)
    same = (user[u_kernel] & no_a) == (kern[u_kernel] & no_a)
    own, shared = u_kernel[~same], u_kernel[same]
    if len(u_kernel) > MAX_USER_KERNEL_SLOTS:
        against.append(f"user PGD maps {len(u_kernel)} kernel-half slots: more than "
                       f"an entry-only view needs")
    if len(u_kernel) == len(k_kernel) and not len(own):
        against.append(f"user PGD's kernel half equals the kernel PGD's ({len(k_kernel)} slots): "
                       f"a full copy, not PTI's reduced view")
    else:
        evidence.append(f"user PGD maps {len(u_kernel)} of the kernel PGD's {len(k_kernel)} "
                        f"kernel-half slots: {_slots(u_kernel, names)}")
    if len(own):
        evidence.append(f"slots {_slots(own, names)} point to user-only tables (clones of a few "
                        f"kernel pieces)")
    if len(shared):
        evidence.append(f"slots {_slots(shared, names)} hold the same entry in both: shared lower tables")


def _judge_user_half(kern: np.ndarray, user: np.ndarray, names: dict[int, str], against: list[str],
                     evidence: list[str]) -> None:
    """Both PGDs carry the user half; the kernel's copies have NX (__pti_set_user_pgtbl())."""
    mask = ~np.uint64(IGNORED)
    differ = np.flatnonzero((kern[:HALF] & mask) != (user[:HALF] & mask))
    if len(differ):
        against.append(f"user-half slots differ beyond NX and A: {_slots(differ[:8], names)}"
                       + (" ..." if len(differ) > 8 else ""))
    user_bits = np.uint64(e.P | e.US)
    in_kernel = np.flatnonzero((kern[:HALF] & user_bits) == user_bits)
    in_user = np.flatnonzero((user[:HALF] & user_bits) == user_bits)
    if len(in_kernel) == 0 and len(in_user) == 0:
        evidence.append("user half empty in both (a kernel thread's or init_mm's pair): "
                        "the NX marking cannot be observed")
        return
    lacking = in_kernel[(kern[in_kernel] & np.uint64(e.NX)) == 0]
    if len(lacking):
        against.append(f"kernel copies of user-half slots {_slots(lacking[:8], names)} lack NX, "
                       f"which __pti_set_user_pgtbl() sets (unless the CPU has no NX)")
    elif len(in_kernel):
        user_nx = (user[in_user] & np.uint64(e.NX)).any()
        evidence.append(f"{len(in_kernel)} user-half slot(s): the kernel copies carry NX, "
                        f"the user copies {'do too' if user_nx else 'do not'}")
