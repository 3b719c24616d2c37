"""Every address space in a memory image, found without symbols and audited."""

from ptilab.scan.spaces import AddressSpace, ImageScan, scan_image

__all__ = ["AddressSpace", "ImageScan", "scan_image"]
