"""Every address space in an image: its page-table roots found by the
kernel half they share (ptilab.scan.roots), each walked and audited.

    >>> result = scan_image("guest.core")
    >>> [(hex(s.kernel_pgd), s.verdict) for s in result.spaces]

The reference kernel half comes from, in this order: a CPU's CR3 in QEMU's
notes, VMCOREINFO's init_top_pgt (swapper_pg_dir, at
va - __START_KERNEL_map + phys_base; the note's, or the copy found in RAM), or a census of the image's frames
(roots.reference_half: of the halves that repeat with their tables in
memory, the one mapping the most slots; a LiME dump or raw image).
A matching frame becomes:

- a kernel-only root when the tables user mode would run on map no page
  user-accessible (US at every level): init_mm's PGD, the real-mode
  trampoline_pgd (setup_real_mode() gives it init_top_pgt's kernel half and
  an identity map of kernel pages), a PGD freed after exit_mmap() cleared
  its user half. No process runs on those;
- else a PTI pair when the kernel uses PTI, the frame is 8 KiB-aligned and
  find_pti_pair() judges the frame after it the user PGD Linux makes (the
  user view is that PGD);
- else an address space without isolation (pti=off, or a process a rootkit
  gave a full PGD).

A candidate counts only if every table it reaches is inside memory and no
entry has reserved bits set (the walk's anomalies); others are listed as
rejected.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from ptilab.audit import Finding, Severity, classify
from ptilab.audit.image import audit_views, exposure_dict, image_exposure
from ptilab.audit.sources import views_from_image
from ptilab.errors import InputError
from ptilab.linux.exposure import UNKNOWN, Exposure, Meltdown
from ptilab.linux.pti_pair import find_pti_pair
from ptilab.memory.physical import PhysicalMemory
from ptilab.paging import EFF_US, Geometry, walk
from ptilab.paging import entry as e
from ptilab.scan import roots

PTI_PAIR, NO_ISOLATION, KERNEL_ONLY = "PTI pair", "no isolation", "kernel-only"
# run(fn, items) -> results in order: map() in process, a Dask client's map elsewhere.
Runner = Callable[[Callable, Sequence], list]


@dataclass(frozen=True)
class Reference:
    """The kernel half every root of this kernel carries, and where it came from."""

    kernel_half: np.ndarray  # 256 uint64
    geometry: Geometry
    pti: bool | None  # known from a CPU's pair; None: decided from the roots found
    source: str


@dataclass
class AddressSpace:
    kernel_pgd: int
    user_pgd: int | None  # the PTI twin user mode runs on; None without one
    kind: str  # PTI_PAIR, NO_ISOLATION or KERNEL_ONLY
    user_view: dict[str, int] = field(default_factory=dict)  # bytes of the kernel per kind the user view maps
    findings: list[Finding] = field(default_factory=list)
    pair_reasons: tuple[str, ...] = ()

    @property
    def worst(self) -> Severity | None:
        return max((f.severity for f in self.findings), default=None)

    @property
    def verdict(self) -> str:
        if self.kind == KERNEL_ONLY:
            return "kernel-only (no user mappings)"
        worst = self.worst
        if worst is None:
            return "clean"
        ids = sorted({f.id for f in self.findings if f.severity == worst})
        return f"{worst.name.lower()}: {', '.join(ids)}"

    def as_dict(self) -> dict:
        return {"kernel_pgd": f"{self.kernel_pgd:#x}",
                "user_pgd": None if self.user_pgd is None else f"{self.user_pgd:#x}",
                "kind": self.kind, "verdict": self.verdict,
                "worst": None if self.worst is None else self.worst.name.lower(),
                "user_view": self.user_view, "findings": [f.as_dict() for f in self.findings],
                "pair_reasons": list(self.pair_reasons)}


@dataclass
class ImageScan:
    path: str
    reference: Reference
    spaces: list[AddressSpace]
    rejected: dict[int, str]  # root candidate -> why it does not walk cleanly
    bytes_scanned: int  # the frames covered
    bytes_read: int  # of those, what was read: a sparse file's holes are skipped
    seconds: float
    exposure: Exposure = UNKNOWN  # what the image says of its CPU and KASLR, applied to every space

    def failed(self, threshold: Severity) -> bool:
        return any(s.worst is not None and s.worst >= threshold for s in self.spaces)

    def as_dict(self) -> dict:
        return {"image": self.path, "reference": self.reference.source, "levels": self.reference.geometry.levels,
                "pti": bool(self.reference.pti), "address_spaces": [s.as_dict() for s in self.spaces],
                "machine": exposure_dict(self.exposure),
                "rejected": {f"{pa:#x}": why for pa, why in self.rejected.items()},
                "bytes_scanned": self.bytes_scanned, "bytes_read": self.bytes_read, "seconds": round(self.seconds, 3)}


# -- the reference kernel half ---------------------------------------------

def _from_cpus(mem: PhysicalMemory, la57: bool | None) -> Reference | None:
    for cpu in mem.cpus:
        geometry = Geometry(5) if la57 else cpu.geometry
        pair = find_pti_pair(mem, cpu.cr3_register, geometry)
        pgd = pair.kernel_pgd if pair.is_pti else cpu.cr3_register.pgd
        if mem.frames_present(np.array([pgd >> e.PAGE_SHIFT], np.uint64))[0]:
            half = mem.read_frame(pgd >> e.PAGE_SHIFT)[roots.HALF:].copy()
            if (half & np.uint64(e.P)).any():
                return Reference(half, geometry, pair.is_pti, f"CPU {cpu.index}'s CR3 {cpu.cr3:#x}")
    return None


def _from_vmcoreinfo(mem: PhysicalMemory, la57: bool | None) -> Reference | None:
    info = mem.vmcoreinfo
    if info is None:
        return None
    pa = info.kernel_pgd
    if not mem.frames_present(np.array([pa >> e.PAGE_SHIFT], np.uint64))[0]:
        return None
    geometry = Geometry(5 if la57 else info.levels)
    half = mem.read_frame(pa >> e.PAGE_SHIFT)[roots.HALF:].copy()
    # init_mm's twin shows whether PTI ran: pti_init() fills it, pti=off leaves it zero.
    pti = find_pti_pair(mem, pa, geometry).is_pti
    where = "" if info.found_at is None else f", VMCOREINFO {info.source}"
    return Reference(half, geometry, pti, f"VMCOREINFO init_top_pgt (pa {pa:#x}{where})")


def _from_census(mem: PhysicalMemory, chunks: list[roots.Chunk], run: Runner, la57: bool | None) -> Reference:
    counts: Counter = Counter()
    for part in run(roots.census_chunk, chunks):
        counts.update(part)
    best = roots.reference_half(counts, mem)
    if best is None:
        raise InputError(f"{chunks[0].path if chunks else 'image'}: no kernel half with its tables in memory "
                         f"repeats in any frame: no Linux page tables found")
    half, n = best
    return Reference(half, Geometry(5 if la57 else 4), None, f"the kernel half {n} frames share")


def choose_reference(mem: PhysicalMemory, chunks: list[roots.Chunk], run: Runner,
                     la57: bool | None = None) -> Reference:
    """The reference kernel half: a CPU's, VMCOREINFO's, or the census's (roots.reference_half)."""
    return _from_cpus(mem, la57) or _from_vmcoreinfo(mem, la57) or _from_census(mem, chunks, run, la57)


# -- from matching frames to address spaces --------------------------------

def _runs_user_code(user_half) -> bool:
    """Does the walked user half map any page user mode can use (US at every level)?"""
    d = user_half.distinct
    return bool((((d["prot"] & np.uint64(e.P)) != 0) & ((d["eff"] & EFF_US) != 0)).any())


def _anomalies(*walks) -> str | None:
    found = [a for w in walks if w is not None for a in w.anomalies]
    return "; ".join(a.detail for a in found[:2]) if found else None


def _user_view(views) -> dict[str, int]:
    kinds = classify(views)
    r, copies = kinds["_ranges"], kinds["_copies"]
    out = {}
    for kind, mask in kinds.items():
        if not kind.startswith("_") and mask.any():
            out["other kernel" if kind == "leak" else kind] = int((r["size"][mask] * copies[mask]).sum())
    return out


def judge_root(mem: PhysicalMemory, pfn: int, ref: Reference, pti: bool,
               exposure: Exposure = UNKNOWN) -> AddressSpace | str:
    """The address space rooted at frame pfn, audited; a string: why it is rejected."""
    pa = pfn << e.PAGE_SHIFT
    g = ref.geometry
    pair = find_pti_pair(mem, pa, g) if pti and pfn % 2 == 0 else None
    user_pgd = pa + e.PAGE_SIZE if pair is not None and pair.is_pti else None
    reasons = pair.reasons if pair is not None else ()
    # The tables user mode would run on: the user PGD of a pair, else the root itself.
    user_half = walk(mem, user_pgd or pa, g, top_slots=(0, roots.HALF))
    bad = _anomalies(user_half)
    if bad:
        return bad
    if not _runs_user_code(user_half):
        # init_mm, a freed mm (exit_mmap() cleared its user half), the real-mode trampoline_pgd.
        return AddressSpace(pa, user_pgd, KERNEL_ONLY, pair_reasons=reasons)
    found = views_from_image(mem, user_pgd or pa, g)
    bad = _anomalies(found.user, found.kernel)
    if bad:
        return bad
    kind = PTI_PAIR if user_pgd is not None else NO_ISOLATION
    return AddressSpace(pa, user_pgd, kind, _user_view(found.views), audit_views(found.views, exposure), reasons)


def _pti_mode(mem: PhysicalMemory, pfns: np.ndarray, ref: Reference) -> bool:
    if ref.pti is not None:
        return ref.pti
    even = [int(p) for p in pfns if p % 2 == 0]
    pairs = sum(find_pti_pair(mem, p << e.PAGE_SHIFT, ref.geometry).is_pti for p in even)
    return pairs * 2 > len(pfns)


def spaces_of(mem: PhysicalMemory, pfns: Iterable[int], ref: Reference,
              exposure: Exposure = UNKNOWN) -> tuple[list[AddressSpace], dict[int, str]]:
    """Judge every matching frame; a PTI pair's user PGD is not a root of its own."""
    pfns = np.unique(np.asarray(list(pfns), dtype=np.uint64))
    pti = _pti_mode(mem, pfns, ref)
    spaces, rejected = [], {}
    twins: set[int] = set()
    for pfn in (int(p) for p in pfns):
        if pfn in twins:
            continue
        got = judge_root(mem, pfn, ref, pti, exposure)
        if isinstance(got, str):
            rejected[pfn << e.PAGE_SHIFT] = got
            continue
        if got.user_pgd is not None:
            twins.add(pfn + 1)
        spaces.append(got)
    return spaces, rejected


def scan_image(path: str, la57: bool | None = None, run: Runner | None = None,
               chunk_frames: int = roots.CHUNK_FRAMES, stated: Meltdown | None = None) -> ImageScan:
    """Find and audit every address space in the image at path. run maps a
    function over chunks (default: in this process, one after another)."""
    from ptilab.memory.images import open_image

    run = run or (lambda fn, items: [fn(i) for i in items])
    start = time.perf_counter()
    mem = open_image(path)
    parts = roots.chunks(mem, path, chunk_frames)
    ref = choose_reference(mem, parts, run, la57)
    half = ref.kernel_half
    found = run(_Match(half), parts)
    pfns = np.concatenate(found) if found else np.zeros(0, np.uint64)
    exposure = image_exposure(mem, mem.vmcoreinfo, stated)
    spaces, rejected = spaces_of(mem, pfns, ref, exposure)
    scanned = sum(c.frames for c in parts) * e.PAGE_SIZE
    read = sum(roots.data_bytes(c) for c in parts)
    return ImageScan(path, ref if ref.pti is not None else _with_pti(ref, spaces), spaces, rejected,
                     scanned, read, time.perf_counter() - start, exposure)


def _with_pti(ref: Reference, spaces: list[AddressSpace]) -> Reference:
    pti = any(s.user_pgd is not None for s in spaces)
    return Reference(ref.kernel_half, ref.geometry, pti, ref.source)


class _Match:
    """scan_chunk with the reference bound: a picklable callable for workers."""

    def __init__(self, kernel_half: np.ndarray):
        self.kernel_half = kernel_half

    def __call__(self, chunk: roots.Chunk) -> np.ndarray:
        return roots.scan_chunk(chunk, self.kernel_half)
