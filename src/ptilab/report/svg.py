"""Drawings as inline SVG text: an address-space map and a page-table tree.

Both take plain data (lists of bars, nodes and edges) and return one <svg>
element as a string, every piece of text passed through html.escape, so an
HTML report can inline them with no network and no graphviz.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape

# Kinds of mapping, most specific first: a bin that holds several shows the first.
KIND_COLOURS = {
    "idt": "#1b9e77",
    "gdt": "#59a14f",
    "entry_stack": "#8cd17d",
    "tss": "#76b7b2",
    "entry_trampoline": "#edc948",
    "exception_stack": "#2f7f6f",
    "debug_store": "#a0cbe8",
    "debug_buffers": "#c7e9c0",
    "cpu_entry_area": "#3c9c6c",
    "entry text": "#e15759",
    "cpu_tss_rw": "#f28e2b",
    "espfix": "#b07aa1",
    "user space": "#4e79a7",
    "direct map": "#9c755f",
    "kernel image": "#79706e",
    "other kernel": "#bab0ac",
}
# Effective rights: writable and executable, the two PTI cares about.
RIGHTS_COLOURS = {"ro NX": "#d4d4d4", "RW NX": "#f1ce63", "ro x": "#e8743b", "RW x": "#d6249f"}
VIEW_COLOURS = {"user": "#1f5fa8", "kernel": "#b5452b", "both": "#2a9d4b"}


def _attrs(**attrs) -> str:
    return " ".join(f'{k.rstrip("_").replace("_", "-")}="{escape(str(v))}"' for k, v in attrs.items())


def _text(x: float, y: float, text: str, **attrs) -> str:
    return f"<text {_attrs(x=f'{x:.1f}', y=f'{y:.1f}', **attrs)}>{escape(text)}</text>"


# -- address-space map ---------------------------------------------------------

@dataclass(frozen=True)
class Segment:
    """A run of bins of one bar with one kind and one rights word."""

    first: int  # bin index
    last: int  # inclusive
    kind: str
    rights: str
    tip: str  # hover text: addresses and what is there


@dataclass(frozen=True)
class MapRow:
    """One region of the address space, drawn as a bar per view."""

    region: str
    start: int
    size: int
    bins: int
    views: dict[str, list[Segment]]  # view name -> segments, in bin order


def size_text(n: int) -> str:
    for unit, shift in (("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    for unit, shift in (("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f}{unit}"
    return f"{n}B"


def log_edges(size: int, bins: int) -> list[int]:
    """Bin edges over [0, size): the first bin is the first 4 KiB, the rest
    grow geometrically, so a page at the start of a 512 GiB region is as
    wide as a gigabyte further up."""
    if size <= 4096 * bins:
        step = max(4096, size // bins)
        return [min(i * step, size) for i in range(bins)] + [size]
    ratio = (size / 4096) ** (1 / (bins - 1))
    edges = [0] + [int(4096 * ratio ** i) for i in range(bins - 1)] + [size]
    for i in range(1, len(edges)):  # keep them strictly increasing and page aligned
        edges[i] = max(edges[i] & ~0xFFF, edges[i - 1] + 1)
    edges[-1] = size
    return edges


def address_map_svg(rows: list[MapRow], views: list[str], titles: dict[str, str], svg_id: str) -> str:
    """Bars per region (rows) and view (columns). Each bar has a kind strip
    and, under it, a rights strip; a log scale from the region's start."""
    label_w, bar_w, gap, row_h, top = 170, 400, 24, 46, 34
    width = label_w + len(views) * (bar_w + gap)
    height = top + len(rows) * row_h + 8
    out = [f'<svg {_attrs(id=svg_id, class_="addr-map", width=width, height=height, viewBox=f"0 0 {width} {height}", role="img")}>',
           f"<title>{escape('address-space map: ' + ', '.join(titles[v] for v in views))}</title>"]
    for i, view in enumerate(views):
        x0 = label_w + i * (bar_w + gap)
        out.append(_text(x0, 16, titles[view], class_="map-title"))
        out.append(_text(x0, 28, "log scale from each region's start", class_="map-note"))
    for r, row in enumerate(rows):
        y = top + r * row_h
        out.append(_text(4, y + 13, row.region, class_="map-region"))
        out.append(_text(4, y + 26, f"{row.start:#x}", class_="map-addr"))
        out.append(_text(4, y + 37, f"{size_text(row.size)}", class_="map-addr"))
        edges = log_edges(row.size, row.bins)
        for i, view in enumerate(views):
            x0 = label_w + i * (bar_w + gap)
            scale = bar_w / row.bins
            out.append(f'<rect {_attrs(x=x0, y=y + 4, width=bar_w, height=20, class_="map-empty")}/>')
            for seg in row.views.get(view, []):
                x = x0 + seg.first * scale
                w = max(1.5, (seg.last - seg.first + 1) * scale)
                colour = KIND_COLOURS.get(seg.kind, KIND_COLOURS["other kernel"])
                out.append(f'<g {_attrs(class_="map-seg", data_kind=seg.kind, data_view=view)}>'
                           f"<title>{escape(seg.tip)}</title>"
                           f'<rect {_attrs(x=f"{x:.2f}", y=y + 4, width=f"{w:.2f}", height=14, fill=colour)}/>'
                           f'<rect {_attrs(x=f"{x:.2f}", y=y + 19, width=f"{w:.2f}", height=5, fill=RIGHTS_COLOURS.get(seg.rights, "#888"))}/>'
                           "</g>")
            for shift in (20, 30, 40):  # 1M, 1G, 1T ticks
                if 1 << shift >= row.size:
                    break
                b = next(k for k, edge in enumerate(edges) if edge >= 1 << shift)
                tx = x0 + b * scale
                out.append(f'<line {_attrs(x1=f"{tx:.1f}", x2=f"{tx:.1f}", y1=y + 24, y2=y + 28, class_="map-tick")}/>')
                out.append(_text(tx, y + 37, f"+{size_text(1 << shift)}", class_="map-addr", text_anchor="middle"))
    out.append("</svg>")
    return "\n".join(out)


def legend_html(kinds: list[str]) -> str:
    items = [f'<span class="swatch" style="background:{KIND_COLOURS.get(k, KIND_COLOURS["other kernel"])}"></span>'
             f"{escape(k)}" for k in kinds]
    items += [f'<span class="swatch rights" style="background:{c}"></span>{escape(r)}'
              for r, c in RIGHTS_COLOURS.items()]
    return '<p class="legend">' + " ".join(f"<span>{i}</span>" for i in items) + "</p>"


# -- page-table tree ------------------------------------------------------------

@dataclass
class TreeNode:
    key: str  # unique id: the table's physical address, or a leaf's label
    depth: int  # 0 = the PGD; the leaf column is one past the last table level
    title: str  # "PUD", "PMD", "page"
    detail: str  # the table's physical address, or what the leaf maps
    views: set[str] = field(default_factory=set)  # which roots reach it: "user", "kernel"
    order: tuple = ()  # where it goes in its column
    leaf: bool = False  # a mapped page (or a hole), not a table
    reaches: set[str] = field(default_factory=set)  # what the walks through it were after: "espfix", ...

    @property
    def shared(self) -> bool:
        return len(self.views) > 1


@dataclass
class TreeEdge:
    parent: str
    child: str
    slot: int
    views: set[str] = field(default_factory=set)


TREE_BOX_W, TREE_LEAF_W, TREE_BOX_H, TREE_COL_W, TREE_ROW_H, TREE_TOP = 156, 236, 50, 214, 62, 26


def table_tree_svg(nodes: list[TreeNode], edges: list[TreeEdge], columns: list[str], svg_id: str) -> str:
    """Tables as boxes in a column per level, entries as edges labelled with
    their slot; a table both roots reach is drawn shared (green, thick)."""
    pos, height = _tree_positions(nodes)
    width = (len(columns) - 1) * TREE_COL_W + TREE_LEAF_W + 16
    out = [f'<svg {_attrs(id=svg_id, class_="table-tree", width=width, height=height, viewBox=f"0 0 {width} {height}", role="img")}>',
           "<title>page-table tree: tables reached from the user and kernel PGDs</title>"]
    for depth, name in enumerate(columns):
        w = TREE_LEAF_W if depth == len(columns) - 1 else TREE_BOX_W
        out.append(_text(8 + depth * TREE_COL_W + w / 2, 16, name, class_="tree-col", text_anchor="middle"))
    depth_of = {node.key: node.depth for node in nodes}
    out += [_tree_edge(edge, pos, depth_of) for edge in edges if edge.parent in pos and edge.child in pos]
    one_tree = not any("kernel" in n.views for n in nodes)  # no PTI: one tree serves both modes
    out += [_tree_node(node, pos[node.key], one_tree, svg_id) for node in nodes]
    out.append("</svg>")
    return "\n".join(out)


def _tree_positions(nodes: list[TreeNode]) -> tuple[dict[str, tuple[float, float]], int]:
    """Each box's top-left corner, its level's column spread evenly over the height; and the height."""
    by_depth: dict[int, list[TreeNode]] = {}
    for node in nodes:
        by_depth.setdefault(node.depth, []).append(node)
    tallest = max((len(v) for v in by_depth.values()), default=1)
    height = TREE_TOP + tallest * TREE_ROW_H + 10
    pos: dict[str, tuple[float, float]] = {}
    for depth, column in by_depth.items():
        column.sort(key=lambda n: n.order)
        band = (height - TREE_TOP) / len(column)
        for i, node in enumerate(column):
            pos[node.key] = (8 + depth * TREE_COL_W, TREE_TOP + band * i + (band - TREE_BOX_H) / 2)
    return pos, height


def _tree_edge(edge: TreeEdge, pos: dict[str, tuple[float, float]], depth_of: dict[str, int]) -> str:
    (px, py), (cx, cy) = pos[edge.parent], pos[edge.child]
    x1, y1, x2, y2 = px + TREE_BOX_W, py + TREE_BOX_H / 2, cx, cy + TREE_BOX_H / 2
    mid = (x1 + x2) / 2
    view = "both" if len(edge.views) > 1 else next(iter(edge.views))
    # A large page skips levels: dashed, so it is not read as entering the boxes it passes.
    skip = " skip" if depth_of[edge.child] - depth_of[edge.parent] > 1 else ""
    return (f'<g {_attrs(class_="tree-edge " + view + skip, data_slot=edge.slot)}>'
            f'<path {_attrs(d=f"M{x1:.1f},{y1:.1f} C{mid:.1f},{y1:.1f} {mid:.1f},{y2:.1f} {x2:.1f},{y2:.1f}", stroke=VIEW_COLOURS[view], fill="none")}/>'
            + _text(x2 - 4, y2 - 4, f"[{edge.slot}]", class_="tree-slot", fill=VIEW_COLOURS[view], text_anchor="end")
            + "</g>")


def _tree_node(node: TreeNode, at: tuple[float, float], one_tree: bool, svg_id: str) -> str:
    x, y = at
    reached = " and ".join(sorted(node.views))
    if node.leaf:
        cls, name, status, w = "tree-leaf", node.title, "", TREE_LEAF_W
        tip = f"{node.title}: {node.detail}, as the {reached} PGD maps it"
    elif node.depth == 0:
        view = next(iter(node.views))
        cls, name, status, w = f"tree-box pgd {view}", f"PGD ({view})", "", TREE_BOX_W
        tip = f"{view} PGD at {node.detail}"
    elif one_tree:
        cls, name, status, w = "tree-box one-tree", node.title, "", TREE_BOX_W
        tip = f"{node.title} table at {node.detail}: the only tree, used in user and kernel mode alike"
    else:
        only = next(iter(node.views)) + " only"
        cls = "tree-box " + ("shared" if node.shared else only.replace(" ", "-"))
        name, status, w = node.title, "shared" if node.shared else only, TREE_BOX_W
        tip = f"{node.title} table at {node.detail}, on the way to {', '.join(sorted(node.reaches))}: " + (
            "one page, reached from both PGDs" if node.shared else f"reached from the {reached} PGD only")
    attrs = {"id": f"{svg_id}-pgd-{next(iter(node.views))}"} if node.depth == 0 else {}
    return (f'<g {_attrs(class_=cls, data_views=" ".join(sorted(node.views)), data_reaches="/".join(sorted(node.reaches)), **attrs)}>'
            f"<title>{escape(tip)}</title>"
            f'<rect {_attrs(x=f"{x:.1f}", y=f"{y:.1f}", width=w, height=TREE_BOX_H, rx=5)}/>'
            + _text(x + 8, y + 16, name, class_="tree-name")
            + _text(x + 8, y + 30, node.detail, class_="tree-detail")
            + (_text(x + 8, y + 43, status, class_="tree-status") if status else "")
            + "</g>")
