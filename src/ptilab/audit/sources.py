"""From a memory image and a CR3 to the views an audit judges."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ptilab.audit.checks import Views
from ptilab.linux.pti_pair import PtiPair, find_pti_pair
from ptilab.memory.physical import PhysicalMemory
from ptilab.paging import EFF_NX, Geometry, Walk, walk
from ptilab.paging import entry as e
from ptilab.paging.cr3 import CR3

PMD_SIZE = 1 << 21


@dataclass
class ImageViews:
    views: Views
    pair: PtiPair
    user: Walk
    kernel: Walk | None
    kaslr_slide: int | None


def views_from_image(mem: PhysicalMemory, cr3: int, geometry: Geometry,
                     symbols: dict[str, int] | None = None) -> ImageViews:
    """Walk the user view (the tree a CPU uses in user mode) and, under PTI,
    its kernel twin. Either half of a PTI pair may be given."""
    pair = find_pti_pair(mem, cr3, geometry)
    if pair.is_pti:
        user = walk(mem, pair.user_pgd, geometry)
        kernel: Walk | None = walk(mem, pair.kernel_pgd, geometry)
        kernel_pgd = mem.read_frame(pair.kernel_pgd >> e.PAGE_SHIFT).copy()
    else:
        # No isolation: the one tree is what user mode runs on.
        user = walk(mem, CR3(cr3).pgd, geometry)
        kernel, kernel_pgd = None, None
    slide = None
    if symbols:
        present = user.distinct[(user.distinct["prot"] & np.uint64(e.P)) != 0]
        slide = infer_kaslr_slide(present, symbols)
        if slide:
            symbols = {name: (addr + slide) & 0xFFFF_FFFF_FFFF_FFFF for name, addr in symbols.items()}
    views = Views.from_walks(user, kernel, kernel_pgd=kernel_pgd,
                             anomalies=user.anomalies + (kernel.anomalies if kernel else []), symbols=symbols or {})
    return ImageViews(views, pair, user, kernel, slide)


def infer_kaslr_slide(user_mapped: np.ndarray, symbols: dict[str, int]) -> int | None:
    """KASLR moves the kernel image in 2 MiB steps; the user view holds the
    entry text's PMD, so the slide is where that PMD is minus where the
    symbols say it would be. None when the view shows no kernel text."""
    text = user_mapped[(user_mapped["va"] >= np.uint64(0xFFFF_FFFF_8000_0000))
                       & (user_mapped["va"] < np.uint64(0xFFFF_FFFF_C000_0000))
                       & ((user_mapped["eff"] & EFF_NX) == 0)]
    if not len(text):
        return None
    # Under PTI only the entry text's PMD is there; without it the whole
    # image is, and its first executable byte is _text.
    anchor = "__entry_text_start" if int(text["size"].sum()) <= 4 << 20 else "_text"
    if anchor not in symbols:
        return None
    return int(text["va"][0]) - (symbols[anchor] & ~(PMD_SIZE - 1))


def views_from_ptdump(path: str, symbols: dict[str, int] | None = None) -> Views:
    """Views from Linux ptdump text: current_user (or a kernel's own file) as
    the user view, and with ptilab simulate's `# current_user` and
    `# current_kernel` titles the kernel view too. The file shows each
    leaf's own flags, not the upper levels'; the lines the ESPfix cap
    skipped count as the repeats they stand for (ptdump.skipped_copies)."""
    from ptilab.formats.ptdump import read_ptdump_views, skipped_copies
    from ptilab.paging import Geometry

    parsed = read_ptdump_views(path)
    user = parsed.get("current_user") or parsed.get(None) or parsed["current_kernel"]
    kernel = parsed.get("current_kernel") if user is not parsed.get("current_kernel") else None
    # 4-level kernel addresses all start 0xffff8...; 5-level ones reach down to 0xff00...
    va = user.ranges["va"][user.ranges["va"] >= np.uint64(1 << 63)]
    levels = 5 if len(va) and int(va.min()) < 0xFFFF_0000_0000_0000 else 4
    return Views(Geometry(levels), user.ranges, kernel.ranges if kernel else None, symbols=symbols or {},
                 user_copies=skipped_copies(user), kernel_copies=skipped_copies(kernel) if kernel else None)


MODEL_PREFIX = "model:"


def views_from_model(spec: str):
    """The user view of a modelled boot spelled model:PROFILE:DESIGN[:CPUS[:LEVELS]]
    (model:linux-6.1:explicit, model:linux-6.12:linux:8:5), as ptilab simulate
    boots it (random cpu_entry_area slots: seed 0); with the booted Kernel."""
    from ptilab.errors import UsageError
    from ptilab.linux.kernel import NR_CPUS_MAX
    from ptilab.linux.profiles import get_profile
    from ptilab.pti import boot

    parts = spec.removeprefix(MODEL_PREFIX).split(":")
    numbers = parts[2:]
    if not 2 <= len(parts) <= 4 or not all(n.isdigit() for n in numbers):
        raise UsageError(f"a model boot is model:PROFILE:DESIGN[:CPUS[:LEVELS]] (model:linux-6.1:explicit), "
                         f"not {spec!r}")
    cpus, levels = (int(numbers[0]) if numbers else 4), (int(numbers[1]) if len(numbers) > 1 else 4)
    if levels not in (4, 5):
        raise UsageError(f"{spec}: paging levels must be 4 or 5, not {levels}")
    if not 1 <= cpus <= NR_CPUS_MAX:
        raise UsageError(f"{spec}: NR_CPUS must be between 1 and {NR_CPUS_MAX}, not {cpus}")
    get_profile(parts[0]).check(cpus, levels)
    kernel = boot(parts[0], parts[1], cpus, levels)
    user = walk(kernel.ram, kernel.user_cr3(), kernel.geometry)
    return Views.from_walks(user), kernel
