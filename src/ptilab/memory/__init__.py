"""Physical memory sources and the boot-time allocators that carve them up."""

from ptilab.memory.physical import PhysicalMemory
from ptilab.memory.simulated import SimulatedRAM

__all__ = ["PhysicalMemory", "SimulatedRAM"]
