"""Plots of TLB-refill cost (ptilab.mmu.cost): against NR_CPUS per design,
and per design at one NR_CPUS. matplotlib is optional: imported only here,
with its Agg backend (no display), and a clear error if it is missing.
"""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from ptilab.errors import UsageError

if TYPE_CHECKING:
    from ptilab.mmu.cost import WorkloadCost

METRICS = {
    "lines": "distinct cache lines loaded by walks",
    "walk_loads": "page-walk loads",
    "tlb_misses": "TLB misses",
    "lines_both_views": "lines walked in both views",
}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_refill(costs: Iterable["WorkloadCost"], path: str | Path, metric: str = "lines", run: str = "cold") -> Path:
    """Write a PNG or SVG (by path's suffix) with two panels: metric summed over
    the workloads against NR_CPUS, one line per design; and per design, one
    bar per workload, at the largest NR_CPUS measured."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg"):
        raise UsageError(f"plot file must end in .png or .svg, not {path.name!r}")
    path.write_bytes(refill_image(costs, path.suffix.lower()[1:], metric, run))
    return path


def refill_image(costs: Iterable["WorkloadCost"], fmt: str = "png", metric: str = "lines",
                 run: str = "cold") -> bytes:
    """plot_refill's figure as PNG or SVG bytes (the HTML report embeds them)."""
    if metric not in METRICS:
        raise UsageError(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")
    costs = list(costs)
    if not costs:
        raise UsageError("nothing to plot")
    value = lambda c: getattr(getattr(c, run), metric)  # noqa: E731
    by_design: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for c in costs:
        by_design[c.design][c.cpus] += value(c)
    top = max(c.cpus for c in costs)
    designs = list(dict.fromkeys(c.design for c in costs))
    workloads = list(dict.fromkeys(c.workload for c in costs))
    at_top = {(c.design, c.workload): value(c) for c in costs if c.cpus == top}

    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for design in designs:
        points = sorted(by_design[design].items())
        left.plot([n for n, _ in points], [v for _, v in points], marker="o", label=design)
    left.set_xscale("log", base=2)
    left.set_xlabel("NR_CPUS")
    left.set_ylabel(f"{METRICS[metric]} ({run}, all workloads)")
    left.set_title("against NR_CPUS")
    left.legend()
    width = 0.8 / max(len(workloads), 1)
    for i, w in enumerate(workloads):
        right.bar([d + i * width for d in range(len(designs))], [at_top.get((d, w), 0) for d in designs],
                  width, label=w)
    right.set_xticks([d + width * (len(workloads) - 1) / 2 for d in range(len(designs))], designs)
    right.set_ylabel(METRICS[metric])
    right.set_title(f"per design, NR_CPUS={top}")
    # Headroom above the tallest bar so the legend never hides one.
    right.set_ylim(0, max(at_top.values(), default=1) * 1.35)
    right.legend(fontsize="small", ncols=len(workloads), loc="upper center")
    first = costs[0]
    fig.suptitle(f"TLB refill cost: {first.profile}, {first.levels}-level, PCID {'on' if first.pcid else 'off'}")
    fig.tight_layout()
    out = io.BytesIO()
    # A fixed date keeps the SVG the same from run to run.
    fig.savefig(out, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
    plt.close(fig)
    return out.getvalue()


def _config_label(config) -> str:
    if not config.pti:
        return f"PTI off, PCID {'on' if config.pcid else 'off'}"
    return f"PTI, PCID {'on' if config.pcid else 'off'}, global {config.global_}, {config.design}"


def overhead_image(costs: Iterable, fmt: str = "png") -> bytes:
    """Cycles per lseek call against the user working set, one line per
    configuration (ptilab.mmu.overhead.CallCost): where flushing without PCID
    starts to dominate."""
    costs = list(costs)
    if not costs:
        raise UsageError("nothing to plot")
    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for c in costs:
        lines[_config_label(c.config)].append((c.working_set, c.cycles_per_call))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for label, points in lines.items():
        points.sort()
        ax.plot([n for n, _ in points], [v for _, v in points], marker="o", label=label)
    ax.set_xscale("symlog", base=2, linthresh=1)
    ax.set_xlabel("user pages touched between two calls")
    ax.set_ylabel("cycles per call")
    ax.set_title(f"lseek1 on {costs[0].core}: cycles per call against the user working set")
    ax.legend(fontsize="small")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
    plt.close(fig)
    return out.getvalue()
