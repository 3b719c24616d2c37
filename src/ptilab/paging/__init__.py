"""SDM truth about x86-64 paging: entry bits, geometry, CR3/PCID, translate, walk.

Nothing in this package knows about Linux."""

from ptilab.paging.cr3 import CR3
from ptilab.paging.geometry import FIVE_LEVEL, FOUR_LEVEL, Geometry
from ptilab.paging.translate import PageFault, Translation, translate
from ptilab.paging.walk import ALIAS_DTYPE, EFF_NX, EFF_RW, EFF_US, RANGE_DTYPE, Anomaly, Walk, coalesce, split_at, walk

__all__ = ["CR3", "FIVE_LEVEL", "FOUR_LEVEL", "Geometry", "PageFault", "Translation", "translate",
           "ALIAS_DTYPE", "EFF_NX", "EFF_RW", "EFF_US", "RANGE_DTYPE", "Anomaly", "Walk", "coalesce", "split_at", "walk"]
