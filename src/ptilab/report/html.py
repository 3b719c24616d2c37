"""One self-contained HTML page: a comparison of the designs, or an audit of an image.

Everything is inline (CSS, SVG, PNG as base64): the file opens from disk with
no network. Each PGD pair is shown twice: as an address-space map, the user
and kernel views side by side with the kernel half coloured by what lives
there, and as the page-table tree behind the pieces PTI must keep in the user
view, where a table both PGDs reach is drawn shared.

    >>> from ptilab.report.html import comparison_report
    >>> Path("report.html").write_text(comparison_report("linux-6.1", cpus=4, levels=4))
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from html import escape
from typing import TYPE_CHECKING

import numpy as np

from ptilab.audit.checks import Views, classify, rights as rights_words
from ptilab.audit.findings import Finding
from ptilab.linux.pti_pair import PtiPair
from ptilab.linux.profiles import CPU_ENTRY_AREA_BASE, LINUX_6_1, Profile
from ptilab.linux.regions import REGIONS
from ptilab.memory.physical import PhysicalMemory
from ptilab.paging import EFF_NX, EFF_RW, Geometry, PageFault, Walk, split_at, translate
from ptilab.paging import entry as e
from ptilab.report.svg import (KIND_COLOURS, MapRow, Segment, TreeEdge, TreeNode, address_map_svg, legend_html,
                               log_edges, size_text, table_tree_svg)

MAP_BINS = 160
RIGHTS = ("ro NX", "RW NX", "ro x", "RW x")  # index: RW bit + 2 * executable
KIND_ORDER = list(KIND_COLOURS)  # most specific first
P4D_SIZE = 1 << 39

if TYPE_CHECKING:
    from ptilab.audit.image import ImageAudit


@dataclass
class Space:
    """One PGD pair to draw: both walks, the memory under them, and what
    names the kernel-half addresses (the cpu_entry_area's layout, the entry text)."""

    name: str
    geometry: Geometry
    mem: PhysicalMemory
    user: Walk
    kernel: Walk | None
    symbols: dict[str, int]
    area_base: int = CPU_ENTRY_AREA_BASE
    area_size: int = P4D_SIZE
    profile: Profile = LINUX_6_1


# -- naming what is mapped ----------------------------------------------------

class Kinds:
    """The kind of every range of a view: a cpu_entry_area piece, entry text,
    cpu_tss_rw, espfix, direct map, user space...; the entry text and TSS
    pages are found in the user view (ptilab.audit.classify) and named the
    same wherever the kernel view maps them."""

    def __init__(self, space: Space):
        self.space = space
        masks = classify(Views.from_walks(space.user, symbols=space.symbols))
        r = masks["_ranges"]
        self.classified = masks
        self.spans = {kind: _spans(r[masks[key]]) for kind, key in
                      (("entry text", "entry text"), ("cpu_tss_rw", "cpu_tss_rw pages"))}
        profile = space.profile
        self.piece_starts = np.array([p.offset for p in profile.per_cpu], dtype=np.int64)
        self.piece_ends = np.array([p.offset + p.pages * e.PAGE_SIZE for p in profile.per_cpu], dtype=np.int64)
        self.piece_kinds = np.array([KIND_ORDER.index(p.kind) for p in profile.per_cpu], dtype=np.int16)

    def cuts(self) -> np.ndarray:
        """Addresses where a kind may change inside one coalesced range."""
        edges = [a for starts, ends in self.spans.values() for a in (*starts.tolist(), *ends.tolist())]
        return np.unique(np.array(edges, dtype=np.uint64))

    def of(self, r: np.ndarray) -> np.ndarray:
        """Kinds of ranges r (already cut at self.cuts()), as indices into KIND_ORDER."""
        s = self.space
        va = r["va"]
        out = np.full(len(r), KIND_ORDER.index("other kernel"), dtype=np.int16)
        for start, end, name in REGIONS[s.geometry.levels]:
            if name in ("user space", "direct map", "espfix", "kernel image"):
                out[(va >= np.uint64(start)) & (va <= np.uint64(end - 1))] = KIND_ORDER.index(name)
        for kind, (starts, ends) in self.spans.items():
            out[_overlaps(r, starts, ends)] = KIND_ORDER.index(kind)
        area = (va >= np.uint64(s.area_base)) & (va <= np.uint64(s.area_base + s.area_size - 1))
        if area.any():
            out[area] = self._pieces(va[area])
        return out

    def _pieces(self, va: np.ndarray) -> np.ndarray:
        p = self.space.profile
        offset = (va - np.uint64(self.space.area_base)).astype(np.int64)
        out = np.full(len(va), KIND_ORDER.index("cpu_entry_area"), dtype=np.int16)
        for piece in p.header:
            out[(offset >= piece.offset) & (offset < piece.offset + piece.pages * e.PAGE_SIZE)] = \
                KIND_ORDER.index(piece.kind)
        in_cpu = offset >= p.first_cpu_offset
        within = (offset - p.first_cpu_offset) % p.stride
        i = np.searchsorted(self.piece_starts, within, side="right") - 1
        hit = in_cpu & (i >= 0) & (within < self.piece_ends[np.maximum(i, 0)])
        out[hit] = self.piece_kinds[i[hit]]
        return out

    def label(self, va: int) -> str:
        """A name for one address, for the tree's leaves."""
        s = self.space
        kind = KIND_ORDER[self.of(_one(va))[0]]
        if s.area_base <= va < s.area_base + s.area_size:
            offset = va - s.area_base
            if offset >= s.profile.first_cpu_offset:
                slot = (offset - s.profile.first_cpu_offset) // s.profile.stride
                # With random slots (6.2+), the slot number is not the CPU's.
                return f"CEA {'slot' if s.profile.random_cea_slots else 'CPU'} {slot} {kind}"
            return f"CEA {kind}"
        return kind


def _one(va: int) -> np.ndarray:
    r = np.zeros(1, dtype=[("va", "<u8"), ("size", "<u8")])
    r["va"], r["size"] = va, e.PAGE_SIZE
    return r


def _spans(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return r["va"].copy(), r["va"] + r["size"]


def _overlaps(r: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Which ranges of r overlap one of the sorted, disjoint spans."""
    if not len(starts):
        return np.zeros(len(r), bool)
    i = np.searchsorted(starts, r["va"] + r["size"], side="left") - 1
    return (i >= 0) & (ends[np.maximum(i, 0)] > r["va"])


def cut(r: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """Split ranges at the given addresses, so each piece has one kind."""
    return split_at(r, cuts)[0]


def _rights_index(eff: np.ndarray) -> np.ndarray:
    return ((eff & EFF_RW) != 0).astype(np.int8) + 2 * ((eff & EFF_NX) == 0).astype(np.int8)


# -- the address-space map ------------------------------------------------------

def _drawn(space: Space, w: Walk) -> np.ndarray:
    """What a map draws of a walk: its runs, frames ignored (the ESPfix
    area's millions of aliases stay a handful), but page by page frame in the
    cpu_entry_area, whose adjacent pieces may share rights and not a name."""
    lo, hi = space.area_base, space.area_base + space.area_size
    r = cut(w.runs(), np.array([lo, hi], dtype=np.uint64))
    area = (r["va"] >= np.uint64(lo)) & (r["va"] <= np.uint64(hi - 1))
    r = np.concatenate((r[~area], w.ranges_within(lo, hi)))
    r = r[np.argsort(r["va"], kind="stable")]
    return r[(r["prot"] & np.uint64(e.P)) != 0]


def map_rows(space: Space, kinds: Kinds, bins: int = MAP_BINS) -> list[MapRow]:
    """A row per region either view maps something in."""
    views = {name: _drawn(space, w) for name, w in (("user", space.user), ("kernel", space.kernel)) if w}
    cuts = kinds.cuts()
    views = {name: cut(r, cuts) for name, r in views.items()}
    regions = list(REGIONS[space.geometry.levels])
    if not any(start <= space.area_base < end and name == "cpu_entry_area" for start, end, name in regions):
        regions.append((space.area_base, space.area_base + space.area_size, "cpu_entry_area"))
        regions.sort()
    rows = []
    for start, end, name in regions:
        size = end - start
        edges = np.array(log_edges(size, bins), dtype=np.uint64)
        segs = {view: _segments(r, start, end, edges, kinds) for view, r in views.items()}
        if any(segs.values()):
            rows.append(MapRow(name, start, size, len(edges) - 1, segs))
    return rows


def _segments(r: np.ndarray, start: int, end: int, edges: np.ndarray, kinds: Kinds) -> list[Segment]:
    last = r["va"] + (r["size"] - np.uint64(1))
    r = r[(last >= np.uint64(start)) & (r["va"] <= np.uint64(end - 1))]
    if not len(r):
        return []
    lo_off = np.maximum(r["va"], np.uint64(start)) - np.uint64(start)
    hi_off = np.minimum(r["va"] + (r["size"] - np.uint64(1)), np.uint64(end - 1)) - np.uint64(start)
    lo = np.searchsorted(edges, lo_off, side="right") - 1
    hi = np.searchsorted(edges, hi_off, side="right") - 1
    prio = kinds.of(r)
    code = _rights_index(r["eff"])
    nbins = len(edges) - 1
    kind_bin = np.full(nbins, len(KIND_ORDER), dtype=np.int16)
    rights_bin = np.full(nbins, -1, dtype=np.int8)
    counts = (hi - lo + 1).astype(np.int64)
    owner = np.repeat(np.arange(len(r)), counts)
    b = lo[owner] + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    np.minimum.at(kind_bin, b, prio[owner])
    np.maximum.at(rights_bin, b, code[owner])
    out: list[Segment] = []
    i = 0
    while i < nbins:
        if rights_bin[i] < 0:
            i += 1
            continue
        j = i
        while j + 1 < nbins and kind_bin[j + 1] == kind_bin[i] and rights_bin[j + 1] == rights_bin[i]:
            j += 1
        # The tip tells of the ranges of the kind the bins show, not of every range
        # sharing their bins (a bin holding a cpu_tss_rw page and 160 MB of other kernel).
        inside = (lo <= j) & (hi >= i) & (prio == kind_bin[i])
        first_va = max(int(r["va"][inside].min()), start + int(edges[i]))
        last_end = min(int((r["va"][inside] + r["size"][inside]).max()), start + int(edges[j + 1]))
        mapped = int((np.minimum(r["va"][inside] + r["size"][inside], np.uint64(start + int(edges[j + 1])))
                      - np.maximum(r["va"][inside], np.uint64(start + int(edges[i])))).sum())
        kind = KIND_ORDER[kind_bin[i]]
        rw = RIGHTS[rights_bin[i]]
        tip = (f"{kind}, {rw}: {first_va:#x}-{last_end:#x}, {size_text(mapped)} mapped "
               f"in {int(inside.sum())} range(s)")
        out.append(Segment(i, j, kind, rw, tip))
        i = j + 1
    return out


def user_kernel_table(space: Space, kinds: Kinds) -> str:
    """What the user view maps of the kernel half, grouped by kind and rights."""
    r = _drawn(space, space.user)
    r = cut(r[r["va"] >= np.uint64(space.geometry.kernel_half_start())], kinds.cuts())
    glb = (r["prot"] & np.uint64(e.G)) != 0
    keys = np.stack([kinds.of(r).astype(np.int64), r["eff"].astype(np.int64), glb.astype(np.int64)], axis=1)
    unique, group = np.unique(keys, axis=0, return_inverse=True)
    group = group.reshape(-1)
    end = r["va"] + r["size"]
    groups: dict[tuple[str, str], list[int]] = {}
    for g, (kind, eff, g_bit) in enumerate(unique.tolist()):
        mine = group == g
        words = rights_words(eff, e.G if g_bit else 0)
        size = int(r["size"][mine].sum())
        groups[(KIND_ORDER[kind], words)] = [int(r["va"][mine].min()), int(end[mine].max()), size // e.PAGE_SIZE, size]
    rows = "".join(
        f'<tr class="uk-row"><td><span class="swatch" style="background:{KIND_COLOURS.get(kind, "#bab0ac")}">'
        f"</span>{escape(kind)}</td><td><code>{first:#x}</code></td><td><code>{end:#x}</code></td>"
        f"<td>{n}</td><td>{escape(size_text(size))}</td><td><code>{escape(words)}</code></td></tr>"
        for (kind, words), (first, end, n, size) in sorted(groups.items(), key=lambda kv: kv[1][0]))
    return ('<table class="user-kernel-view"><caption>kernel-half mappings of the user view, by kind '
            "and rights</caption><thead><tr><th>kind</th><th>first</th><th>end</th><th>pages</th>"
            f"<th>mapped</th><th>rights</th></tr></thead><tbody>{rows}</tbody></table>")


# -- the page-table tree ----------------------------------------------------------

def tree_targets(space: Space, kinds: Kinds) -> list[tuple[str, int]]:
    """Addresses whose walks show the sharing: the first and last page of
    the cpu_entry_area and of the cpu_tss_rw pages, an espfix page, the entry text."""
    masks = kinds.classified
    r = masks["_ranges"]
    out: list[tuple[str, int]] = []
    # The area by the space's own bounds: kaiser-2017 kept it in the fixmap.
    area = (r["va"] >= np.uint64(space.area_base)) & (r["va"] <= np.uint64(space.area_base + space.area_size - 1))
    for key, both_ends in (("cpu_entry_area", True), ("espfix", False), ("entry text", False),
                           ("cpu_tss_rw pages", True)):
        sel = r[area if key == "cpu_entry_area" else masks[key]]
        name = key.replace(" pages", "")
        if len(sel):
            out.append((name, int(sel["va"][0])))
            if both_ends and len(sel) > 1:
                out.append((name, int(sel["va"][-1])))
    return out


def tree_svg(space: Space, kinds: Kinds, svg_id: str) -> str:
    nodes, edges = table_tree(space, kinds, tree_targets(space, kinds))
    columns = [n.upper() for n in space.geometry.names] + ["mapped page"]
    return table_tree_svg(nodes, edges, columns, svg_id)


def table_tree(space: Space, kinds: Kinds, targets: list[tuple[str, int]]) -> tuple[list[TreeNode], list[TreeEdge]]:
    """The tables each root walks through to reach each target, merged: a
    table reached from both roots is one node with both views."""
    g = space.geometry
    roots = {"user": space.user.cr3}
    if space.kernel is not None:
        roots["kernel"] = space.kernel.cr3
    nodes: dict[str, TreeNode] = {}
    edges: dict[tuple[str, str, int], TreeEdge] = {}
    first_seen: dict[str, int] = {}

    def node(key: str, depth: int, title: str, detail: str, view: str, ordinal: int) -> str:
        n = nodes.setdefault(key, TreeNode(key, depth, title, detail))
        n.views.add(view)
        n.reaches.add(what)
        first_seen[key] = min(first_seen.get(key, ordinal), ordinal)
        return key

    for ordinal, (what, va) in enumerate(targets):
        label = kinds.label(va)
        for view, cr3 in roots.items():
            try:
                t = translate(space.mem, cr3, va, g)
                reads, leaf = t.reads, t
            except PageFault as fault:
                reads, leaf = fault.reads, None
            parent = node(f"t{cr3.pgd:x}", 0, "PGD", f"{cr3.pgd:#x}", view, -1)
            for depth, read in enumerate(reads):
                slot = (read.pa & 0xFFF) // 8
                if depth + 1 < len(reads):
                    table = reads[depth + 1].pa & ~0xFFF
                    child = node(f"t{table:x}", depth + 1, g.names[depth + 1].upper(), f"{table:#x}", view, ordinal)
                elif leaf is not None:
                    words = ("RW" if leaf.writable else "ro") + (" x" if leaf.executable else " NX") + (
                        " GLB" if leaf.global_ else "")
                    child = node(f"p{ordinal}:{leaf.pa & ~0xFFF:x}:{words}", g.levels, label,
                                 f"{size_text(leaf.page_size)} {words}", view, ordinal)
                else:
                    child = node(f"p{ordinal}:unmapped", g.levels, label, "not mapped", view, ordinal)
                edge = edges.setdefault((parent, child, slot), TreeEdge(parent, child, slot))
                edge.views.add(view)
                parent = child
    for key, n in nodes.items():
        if n.depth == 0:
            n.order = (-1,) if "user" in n.views else (1 << 30,)
        else:
            group = 1 if n.shared else (0 if "user" in n.views else 2)
            n.order = (first_seen[key], group)
        n.leaf = n.depth == g.levels
    return list(nodes.values()), list(edges.values())


# -- the page ------------------------------------------------------------------

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 2px solid #ddd; }
.subject { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0; } caption { text-align: left; color: #555; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } code { font-size: 0.92em; }
tr.sev-critical td:first-child, tr.sev-high td:first-child { background: #f8c9c4; font-weight: bold; }
tr.sev-medium td:first-child { background: #fbe3b6; } tr.sev-low td:first-child { background: #fff3c4; }
tr.sev-info td:first-child { background: #e3eefa; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin: 0 0.3em 0 0.8em; vertical-align: -1px;
          border: 1px solid #888; } .legend .swatch.rights { height: 0.45em; } .legend > span { white-space: nowrap; }
.figure { overflow-x: auto; margin: 0.5em 0 1em; }
svg text { font: 11px system-ui, sans-serif; fill: #222; } svg .map-title { font-weight: bold; font-size: 12px; }
svg .map-note, svg .map-addr { fill: #666; font-size: 10px; } svg .map-region { font-weight: bold; }
svg .map-empty { fill: #f4f4f4; stroke: #ccc; } svg .map-tick { stroke: #999; }
svg .tree-col { font-weight: bold; } svg .tree-box rect, svg .tree-leaf rect { fill: #fafafa; stroke: #999; }
svg .tree-box.pgd rect { fill: #e8eef8; stroke: #1f5fa8; stroke-width: 2; }
svg .tree-box.shared rect { fill: #c9efd3; stroke: #2a9d4b; stroke-width: 3; }
svg .tree-box.user-only rect { fill: #dfe9f7; stroke: #1f5fa8; } svg .tree-box.kernel-only rect { fill: #f7e1db; stroke: #b5452b; }
svg .tree-leaf rect { fill: #fff; stroke-dasharray: 3 2; } svg .tree-name { font-weight: bold; }
svg .tree-detail, svg .tree-status { font-size: 10px; fill: #444; } svg .tree-edge path { stroke-width: 1.6; }
svg .tree-edge.both path { stroke-width: 3; } svg .tree-edge.skip path { stroke-dasharray: 6 4; } svg .tree-slot { font-size: 10px; }
.note { color: #555; max-width: 60em; }
"""


def _page(title: str, subject: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{escape(title)}</h1><p class=\"subject\">{escape(subject)}</p>"
            + "\n".join(body) + "</body></html>\n")


TREE_NOTE = ("Boxes are page-table pages, one column per level; an edge is an entry, labelled with its "
             "slot. Blue: reached from the user PGD only; red: from the kernel PGD only; green and "
             "thick: the same table page reached from both (shared, not copied). A dashed edge is a "
             "large-page entry mapping its page directly.")
MAP_NOTE = ("Each bar is one region of the address space on a log scale from the region's start, so a "
            "4 KiB page at its start is visible beside gigabytes further up. Top strip: what is mapped "
            "there; bottom strip: its effective rights. Hover for addresses.")


def space_sections(space: Space, prefix: str) -> list[str]:
    """The map, the user view's kernel half in words, and the tree for one PGD pair."""
    kinds = Kinds(space)
    rows = map_rows(space, kinds)
    views = ["user"] + (["kernel"] if space.kernel else [])
    titles = {"user": f"user view (PGD {space.user.cr3.pgd:#x})"}
    if space.kernel:
        titles["kernel"] = f"kernel view (PGD {space.kernel.cr3.pgd:#x})"
    shown = sorted({seg.kind for row in rows for segs in row.views.values() for seg in segs}, key=KIND_ORDER.index)
    return [
        f'<h3>Address space</h3><p class="note">{escape(MAP_NOTE)}</p>',
        legend_html(shown),
        f'<div class="figure">{address_map_svg(rows, views, titles, f"{prefix}-map")}</div>',
        user_kernel_table(space, kinds),
        f'<h3>Page-table tree</h3><p class="note">{escape(TREE_NOTE)}</p>',
        f'<div class="figure">{tree_svg(space, kinds, f"{prefix}-tree")}</div>',
    ]


OVERHEAD_WORKING_SETS = (0, 4, 16, 64, 256)


def _plots_section(profile: str, cpus: int, levels: int, designs: list[str]) -> str:
    """The cost model's answer to the seed's "fewer cache lines to refill the
    TLB" at the report's NR_CPUS (every NR_CPUS gives the same counts: the
    workloads run on CPU 0), and what varies in time: cycles per lseek call
    against the user working set, per PTI configuration."""
    from ptilab.mmu import overhead as oh
    from ptilab.mmu.cost import PTI_OFF, sweep
    from ptilab.report.plots import METRICS, overhead_image

    at = sweep(profile, [cpus], [*designs, PTI_OFF], levels, None, True, 0)
    configs = [oh.Config(False, True, None, None), oh.Config(True, True, "entry", designs[-1]),
               *(oh.Config(True, False, g, designs[-1]) for g in oh.GLOBALS)]
    calls = oh.working_set_sweep(list(OVERHEAD_WORKING_SETS), configs)
    data = base64.b64encode(overhead_image(calls, "png")).decode("ascii")
    workloads = list(dict.fromkeys(c.workload for c in at))
    head = "".join(f"<th>{escape(w)}</th>" for w in workloads)
    rows = []
    for design in dict.fromkeys(c.design for c in at):
        cells = {c.workload: c.cold for c in at if c.design == design}
        rows.append(f'<tr class="cost-row" data-design="{escape(design)}"><td><code>{escape(design)}</code></td>'
                    + "".join(f"<td>{cells[w].lines} ({cells[w].lines_both_views})"
                              f"{' <strong>faults</strong>' if cells[w].faults else ''}</td>" for w in workloads)
                    + "</tr>")
    return ('<section id="plots"><h2>TLB-refill cost</h2>'
            f'<p class="note">Cold runs with PCID at NR_CPUS={cpus}: {escape(METRICS["lines"])} per workload, in '
            "brackets those both the kernel and the user view's walks load (what shared tables save). "
            "'off' is PTI off, the baseline. NR_CPUS changes none of these counts.</p>"
            f'<table id="cost-table"><thead><tr><th>design</th>{head}</tr></thead><tbody>{"".join(rows)}'
            "</tbody></table>"
            '<p class="note">In cycles (ptilab overhead, kaiser-2017 on the skylake preset): the lseek1 round trip '
            "per configuration, against the user pages touched between two calls. Without PCID every CR3 write "
            "flushes them and each call walks them again.</p>"
            '<img id="cost-plot" alt="cycles per lseek call against the user working set, per PTI configuration" '
            f'src="data:image/png;base64,{data}"></section>')


def comparison_report(profile: str = "linux-6.1", cpus: int = 4, levels: int = 4,
                      designs: list[str] | None = None) -> str:
    """HTML comparing every design on one modelled kernel."""
    from ptilab.compare.metrics import measure
    from ptilab.linux.kernel import ENTRY_TEXT
    from ptilab.pti import boot
    from ptilab.paging import walk
    from ptilab.pti import DESIGNS

    designs = designs or list(DESIGNS)
    booted = [boot(profile, d, cpus, levels) for d in designs]
    reports = [measure(k) for k in booted]
    body = [_comparison_table(reports), _plots_section(profile, cpus, levels, designs)]
    symbols = {"__entry_text_start": ENTRY_TEXT[0], "__entry_text_end": ENTRY_TEXT[1]}
    for kernel, report in zip(booted, reports):
        space = Space(report.design, kernel.geometry, kernel.ram, walk(kernel.ram, kernel.user_cr3(), kernel.geometry),
                      walk(kernel.ram, kernel.kernel_cr3(), kernel.geometry), symbols, kernel.area_base,
                      kernel.area_end - kernel.area_base, kernel.profile)
        summary = DESIGNS[report.design].summary
        body.append(f'<section class="design" id="design-{escape(report.design)}">'
                    f"<h2>Design <code>{escape(report.design)}</code></h2><p class=\"note\">{escape(summary)}</p>"
                    + "\n".join(space_sections(space, f"d-{report.design}")) + "</section>")
    return _page(f"PTI designs on {profile}",
                 f"{cpus} CPUs, {levels}-level paging; every design booted in the model and both views walked",
                 body)


def _comparison_table(reports) -> str:
    head = ("design", "user tables", "entry writes", "AP work", "allocator bugs", "tables shared/own",
            "kernel pages seen by user", "cpu_entry_area vs kernel")
    rows = []
    for r in reports:
        ap = f"{r.ap_allocations} allocs, {r.ap_writes} writes" if r.ap_work else "none"
        div = "identical" if not r.cea_divergences else "; ".join(
            f"{d.kind} {d.va:#x}+{d.pages}p (user {d.user}, kernel {d.kernel})" for d in r.cea_divergences[:3]) + (
            f"; +{len(r.cea_divergences) - 3} more" if len(r.cea_divergences) > 3 else "")
        cells = (r.design, f"{r.user_table_pages} ({r.user_table_bytes // 1024} KiB)", str(r.pte_writes), ap,
                 "; ".join(r.violations) or "none", f"{r.tables_shared_with_kernel}/{r.tables_user_only}",
                 str(r.user_kernel_pages), div)
        rows.append(f'<tr class="design-row" data-design="{escape(r.design)}">'
                    + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>")
    return ('<section id="comparison"><h2>Comparison</h2><table id="compare-table"><thead><tr>'
            + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr></thead><tbody>" + "".join(rows)
            + "</tbody></table></section>")


def audit_report(result: "ImageAudit", mem: PhysicalMemory) -> str:
    """HTML of an image's audit (audit.image.audit_image(), walks kept): what is
    known of the machine and from where, the PGD pair, the findings, both views
    and the tree."""
    from ptilab.report.tables import audit_header

    found = result.found
    if found is None:
        raise ValueError("audit_report needs the audit's walks (an ImageAudit from audit_image)")
    space = Space("image", found.views.geometry, mem, found.user, found.kernel, found.views.symbols)
    machine = "".join(f"<li>{escape(line)}</li>" for line in audit_header(result))
    body = [f'<section id="machine"><h2>The machine</h2><ul>{machine}</ul></section>',
            _pair_section(found.pair, result.kaslr_slide), _findings_section(list(result.findings)),
            '<section id="views"><h2>The PGD pair</h2>' + "\n".join(space_sections(space, "image")) + "</section>"]
    return _page("PTI audit", result.subject, body)


def _pair_section(pair: PtiPair, slide: int | None) -> str:
    verdict = "a Linux PTI pair" if pair.is_pti else "not a PTI pair"
    reasons = "".join(f"<li>{escape(r)}</li>" for r in pair.reasons)
    extra = f"; KASLR slide {slide:#x}" if slide else ""
    return (f'<section id="pair"><h2>PGD pair</h2><p>kernel PGD <code>{pair.kernel_pgd:#x}</code>, user PGD '
            f"<code>{pair.user_pgd:#x}</code>: <strong>{escape(verdict)}</strong>{escape(extra)}</p>"
            f"<ul>{reasons}</ul></section>")


def _findings_section(findings: list[Finding]) -> str:
    rows = []
    for f in findings:
        spans = "".join(f"<li><code>{s.start:#x}-{s.end:#x}</code> {escape(s.view)} {escape(s.rights)}"
                        f"{(' ' + escape(s.label)) if s.label else ''}</li>" for s in f.spans[:8])
        more = f"<li>+{len(f.spans) - 8} more</li>" if len(f.spans) > 8 else ""
        sev = f.severity.name.lower()
        rows.append(f'<tr class="finding sev-{sev}" data-id="{escape(f.id)}"><td>{escape(sev)}</td>'
                    f"<td><code>{escape(f.id)}</code></td><td><strong>{escape(f.title)}</strong><br>"
                    f"{escape(f.explanation)}<ul>{spans}{more}</ul></td></tr>")
    if not rows:
        rows.append('<tr class="no-findings"><td colspan="3">no findings</td></tr>')
    return ('<section id="findings"><h2>Findings</h2><table id="findings-table"><thead><tr><th>severity</th>'
            "<th>id</th><th>finding</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table></section>")
