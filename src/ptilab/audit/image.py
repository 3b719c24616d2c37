"""One audit of one source: its views, what it says of its machine, and the findings.

Every way into an audit (``ptilab audit IMAGE``, many images on a cluster,
``--ptdump``, ``--live``, ``scan``'s address spaces, ``boot``) builds an
ImageAudit here, so each reports the same facts; JSON is made from it at the
edge (ImageAudit.as_dict()).

What the image says of its machine comes from the kernel itself (its log in
the dump, or on a live machine sysfs, /proc/cpuinfo and /dev/kmsg), then
from what the user states (ptilab.linux.exposure has the rules).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

from ptilab.audit.checks import Views, audit
from ptilab.audit.findings import Finding
from ptilab.audit.sources import ImageViews, views_from_image, views_from_ptdump
from ptilab.errors import PtilabError
from ptilab.linux import exposure as ex
from ptilab.memory.physical import PhysicalMemory
from ptilab.memory.vmcoreinfo import VmcoreInfo

if TYPE_CHECKING:
    from ptilab.audit.live import LiveKernel
    from ptilab.linux.pti_pair import PtiPair


@dataclass(frozen=True)
class ImageAudit:
    """An audit's result, as plain data.

    subject: what was audited, in words. cr3/levels: the tree judged (None
    for ptdump text). pair: the PTI pair found from it. kaslr_slide: the
    kernel image's KASLR slide where known (VMCOREINFO's KERNELOFFSET, the
    live kernel's, else inferred from symbols). vmcoreinfo: the image's,
    when it has one. exposure: what the image and the user say of the CPU and
    KASLR. found: the walks (dropped where results travel between processes).
    """

    subject: str
    findings: tuple[Finding, ...]
    exposure: ex.Exposure
    image: str | None = None
    cr3: int | None = None
    levels: int | None = None
    pair: PtiPair | None = None
    kaslr_slide: int | None = None
    vmcoreinfo: VmcoreInfo | None = None
    prstatus_cpus: int = 0
    live: LiveKernel | None = field(default=None, compare=False)
    found: ImageViews | None = field(default=None, compare=False, repr=False)
    views: Views | None = field(default=None, compare=False, repr=False)

    def without_walks(self) -> "ImageAudit":
        """The same result without its arrays and file handles: what a worker sends back."""
        return replace(self, found=None, views=None, live=None)

    def as_dict(self) -> dict:
        out: dict = {"subject": self.subject}
        if self.image is not None:
            out |= {"image": self.image, "cr3": f"{self.cr3:#x}"}
        if self.pair is not None:
            out["pti_pair"] = {"kernel_pgd": f"{self.pair.kernel_pgd:#x}", "user_pgd": f"{self.pair.user_pgd:#x}",
                               "is_pti": self.pair.is_pti, "reasons": list(self.pair.reasons)}
        out["kaslr_slide"] = None if self.kaslr_slide is None else f"{self.kaslr_slide:#x}"
        if self.live is not None:
            out["live"] = self.live.as_dict()
        if self.vmcoreinfo is not None or self.image is not None:
            out["vmcoreinfo"] = _vmcoreinfo_dict(self.vmcoreinfo, self.prstatus_cpus)
        out["machine"] = exposure_dict(self.exposure)
        out["findings"] = [f.as_dict() for f in self.findings]
        return out


def _vmcoreinfo_dict(info: VmcoreInfo | None, prstatus_cpus: int) -> dict | None:
    if info is None:
        return None
    return {"osrelease": info.osrelease, "kernel_offset": f"{info.kernel_offset:#x}",
            "init_top_pgt": f"{info.kernel_pgd:#x}", "levels": info.levels, "prstatus_cpus": prstatus_cpus,
            "source": "note" if info.found_at is None else "memory",
            "found_at": None if info.found_at is None else f"{info.found_at:#x}"}


def exposure_dict(x: ex.Exposure) -> dict:
    evidence = lambda items: [{"source": e.source, "says": e.says} for e in items]  # noqa: E731
    return {"meltdown": x.meltdown.value, "cpu": x.cpu, "meltdown_evidence": evidence(x.meltdown_evidence),
            "conflicting": evidence(x.conflicts), "kaslr": x.kaslr, "kaslr_evidence": evidence(x.kaslr_evidence),
            "cmdline": x.cmdline}


@dataclass(frozen=True)
class ImageError:
    """An image a task could not read, and the one-line reason."""

    path: str
    message: str

    def as_dict(self) -> dict:
        return {"image": self.path, "error": self.message}


# -- what an image says of its machine ---------------------------------------------

def image_log(mem: PhysicalMemory, info: VmcoreInfo | None) -> list[str] | None:
    """The kernel log's lines out of the dump's printk ring; None where it cannot be read."""
    from ptilab.linux.printk import read_kernel_log

    if info is None:
        return None
    try:
        return [line for record in read_kernel_log(mem, info) for line in record.text.splitlines()]
    except PtilabError:
        return None  # a kernel before 5.10, or a ring the dump did not keep: the log says nothing


def image_exposure(mem: PhysicalMemory, info: VmcoreInfo | None, stated: ex.Meltdown | None = None,
                   slide: int | None = None) -> ex.Exposure:
    """What the dump's own log and VMCOREINFO, then the user, say of the CPU and KASLR."""
    lines = image_log(mem, info) or []
    return ex.exposure_from_log(lines, stated, info.kernel_offset if info is not None else None, slide)


# -- the audits ------------------------------------------------------------------------

def audit_views(views: Views, exposure: ex.Exposure) -> list[Finding]:
    """The checks, told what is known of the machine."""
    return audit(replace(views, exposure=exposure))


def audit_image(mem: PhysicalMemory, image: str, cr3: int, levels_geometry, symbols: dict[str, int] | None = None,
                stated: ex.Meltdown | None = None, busy: Callable | None = None) -> ImageAudit:
    """Audit the tree at cr3 in an opened image, with what the image says of its machine."""
    info = mem.vmcoreinfo
    with (busy or (lambda _: nullcontext()))("walking the page tables"):
        found = views_from_image(mem, cr3, levels_geometry, symbols)
    slide = info.kernel_offset if info is not None else found.kaslr_slide
    exposure = image_exposure(mem, info, stated, found.kaslr_slide)
    findings = audit_views(found.views, exposure)
    return ImageAudit(f"{image} (CR3 {cr3:#x}, {levels_geometry.levels}-level)", tuple(findings), exposure,
                      image=image, cr3=cr3, levels=levels_geometry.levels, pair=found.pair, kaslr_slide=slide,
                      vmcoreinfo=info, prstatus_cpus=mem.prstatus_cpus, found=found, views=found.views)


def audit_image_file(path: str, cpu: int | None = None, la57: bool | None = None,
                     symbols: dict[str, int] | None = None, stated: ex.Meltdown | None = None) -> ImageAudit:
    """Open the image at path, pick its CR3 as ``ptilab audit`` does, and audit it."""
    from ptilab.linux.paging_mode import image_root
    from ptilab.memory.images import open_image

    mem = open_image(path)
    try:
        cr3, geometry = image_root(mem, path, cpu, la57)
        return audit_image(mem, path, cr3, geometry, symbols, stated)
    finally:
        mem.close()


def audit_ptdump(path: str, symbols: dict[str, int] | None = None, stated: ex.Meltdown | None = None) -> ImageAudit:
    """Audit ptdump text: only the user's word tells of the machine."""
    views = views_from_ptdump(path, symbols)
    exposure = ex.exposure([], stated)
    return ImageAudit(path, tuple(audit_views(views, exposure)), exposure, views=views)


def audit_running_kernel(kernel: LiveKernel, symbols: dict[str, int] | None, cr3: int | None = None,
                         stated: ex.Meltdown | None = None) -> ImageAudit:
    """Audit the running kernel: its tables through /proc/kcore, held against its own reports."""
    from ptilab.audit.live import audit_live

    result = audit_live(kernel, symbols, cr3, stated)
    found = result.found
    subject = (f"the running kernel {kernel.info.osrelease} ({kernel.kcore.path}, PGD {found.pair.kernel_pgd:#x}, "
               f"{kernel.geometry.levels}-level)")
    return ImageAudit(subject, tuple(result.findings), result.exposure, cr3=found.pair.kernel_pgd,
                      levels=kernel.geometry.levels, pair=found.pair, kaslr_slide=found.kaslr_slide,
                      vmcoreinfo=kernel.info, live=kernel, found=found, views=found.views)
