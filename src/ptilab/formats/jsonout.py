"""Walks as plain JSON-ready data: every range, with its rights spelled out."""

from __future__ import annotations

import numpy as np

from ptilab.paging import EFF_NX, EFF_RW, EFF_US, Geometry, Walk
from ptilab.paging import entry as e


def walk_to_dict(w: Walk, present_only: bool = True) -> dict:
    names = w.geometry.names
    return {
        "cr3": f"{w.cr3.value:#x}",
        "levels": w.geometry.levels,
        "table_pages": {names[d]: int(len(t)) for d, t in enumerate(w.tables)},
        "anomalies": [a.__dict__ for a in w.anomalies],
        "ranges": ranges_to_list(w.mapped if present_only else w.ranges, w.geometry),
    }


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
