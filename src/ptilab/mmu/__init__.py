"""The MMU side of PTI: TLB, paging-structure caches and the cache lines page
walks load, driven by the model's real tables; entry/exit workloads; what the
seed's "a wee bit faster" claim costs in refills; Meltdown exposure.

>>> from ptilab.mmu.cost import cost
>>> [c.cold.lines for c in cost("linux-6.1", "linux", cpus=4, workload="syscall", pcid=True)]

(The functions stay in their modules: re-exporting cost() here would hide
the ptilab.mmu.cost module behind the function of the same name.)
"""

from ptilab.mmu.caches import DataCache, PagingStructureCaches
from ptilab.mmu.mmu import MMU, MMUStats
from ptilab.mmu.tlb import TLB, TLBEntry

__all__ = ["DataCache", "MMU", "MMUStats", "PagingStructureCaches", "TLB", "TLBEntry"]
