"""ptilab: x86-64 kernel page-table isolation (KAISER / Linux PTI), executable.

The public API a kernel developer uses from a Python prompt::

    from ptilab.pti import boot
    from ptilab.paging import walk
    kernel = boot("linux-6.1", design="linux", cpus=4)
    ranges = walk(kernel.ram, kernel.user_cr3(), kernel.geometry)
"""

__version__ = "0.1.0"
