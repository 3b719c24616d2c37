import pytest

from ptilab.memory.simulated import SimulatedRAM


def pytest_configure(config):
    """Let a fixture build show its progress through pytest's capture (tests/realkernel/conftest.py)."""
    import tests.realkernel.conftest as realkernel
    realkernel.PYTEST_CONFIG = config


class BumpTables:
    """A RAM with a trivial table allocator: enough for paging-only tests."""

    def __init__(self, size: int = 1 << 30, first_table: int = 0x100000):
        self.ram = SimulatedRAM(size)
        self.next = first_table

    def alloc(self) -> int:
        pa = self.next
        self.next += 0x1000
        return pa


@pytest.fixture
def bump() -> BumpTables:
    return BumpTables()
