"""Names for addresses: ptilab.linux.regions labels every range of a user
view (label_ranges()), and names a cpu_entry_area piece (cea_piece()); the
audit, meltdown, the HTML report and ptilab diff all name through it."""

from __future__ import annotations

from ptilab.linux.regions import cea_piece, label_kinds, label_ranges

__all__ = ["cea_piece", "label_kinds", "label_ranges"]
