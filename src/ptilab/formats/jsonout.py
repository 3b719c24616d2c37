"""Walks as plain JSON-ready data: each distinct range with its rights spelled out, and the aliases.

A walk is given as the walker summarises it, never expanded:

    {"cr3", "levels", "table_pages": {level name: count},
     "anomalies": [...],
     "mapped_bytes": present bytes of the full address space, aliases counted,
     "ranges": [the distinct records (present ones only by default), see ranges_to_list],
     "aliases": [{"start", "end", "source", "level"}, ...]}

An alias says that its reach [start, end) holds what [source, source + (end
- start)) holds, moved to start; level names the entry that points at the
shared table. The full address space is "ranges" with every alias applied,
deepest level first (a shallower alias's source may hold deeper aliases).
"""

from __future__ import annotations

import numpy as np

from ptilab.paging import EFF_NX, EFF_RW, EFF_US, Geometry, Walk
from ptilab.paging import entry as e


def walk_to_dict(w: Walk, present_only: bool = True) -> dict:
    """The walk as JSON-ready data: distinct records and the aliases that repeat them (module docstring)."""
    names = w.geometry.names
    r = w.distinct
    if present_only:
        r = r[(r["prot"] & np.uint64(e.P)) != 0]
    return {
        "cr3": f"{w.cr3.value:#x}",
        "levels": w.geometry.levels,
        "table_pages": {names[d]: int(len(t)) for d, t in enumerate(w.tables)},
        "anomalies": [a.__dict__ for a in w.anomalies],
        "mapped_bytes": w.mapped_bytes(),
        "ranges": ranges_to_list(r, w.geometry),
        "aliases": aliases_to_list(w.aliases, w.geometry),
    }


def aliases_to_list(aliases: np.ndarray, geometry: Geometry) -> list[dict]:
    """ALIAS_DTYPE records as dicts: [start, end) repeats [source, source + end - start)."""
    names = geometry.names
    return [{"start": f"{va:#018x}", "end": f"{(va + size) & 0xFFFF_FFFF_FFFF_FFFF:#018x}",
             "source": f"{source:#018x}", "level": names[level]}
            for va, size, source, level in zip(aliases["va"].tolist(), aliases["size"].tolist(),
                                               aliases["source"].tolist(), aliases["level"].tolist())]


def ranges_to_list(ranges: np.ndarray, geometry: Geometry) -> list[dict]:
    """RANGE_DTYPE records as dicts with their rights spelled out."""
    names = geometry.names
    return [
            {
                "start": f"{va:#018x}",
                "end": f"{(va + size) & 0xFFFF_FFFF_FFFF_FFFF:#018x}",
                "size": size,
                "pa": f"{pa:#x}",
                "level": names[level],
                "present": bool(prot & e.P),
                "user": bool(eff & EFF_US),
                "writable": bool(eff & EFF_RW),
                "executable": not eff & EFF_NX,
                "global": bool(prot & e.G),
                "flags": e.describe(prot),
            }
            for va, size, pa, level, prot, eff in zip(
                ranges["va"].tolist(), ranges["size"].tolist(), ranges["pa"].tolist(),
                ranges["level"].tolist(), ranges["prot"].tolist(), ranges["eff"].tolist())
    ]
