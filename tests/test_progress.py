"""Progress reporting: library loops tell an installed reporter, and nobody otherwise."""

from ptilab import progress
from ptilab.compare.metrics import compare
from ptilab.pti import boot
from ptilab.mmu.cost import sweep


class Recorder:
    def __init__(self):
        self.steps: list[tuple[str, int, int | None]] = []

    def step(self, what: str, done: int, total: int | None) -> None:
        self.steps.append((what, done, total))

    def of(self, what: str) -> list[tuple[int, int | None]]:
        return [(done, total) for w, done, total in self.steps if w == what]


def test_booting_reports_each_ap_brought_up():
    with progress.reporting(Recorder()) as seen:
        boot("linux-6.1", "linux", cpus=4)
    assert seen.of("booting APs") == [(0, 3), (1, 3), (2, 3), (3, 3)]


def test_a_sweep_reports_each_nr_cpus_and_design():
    with progress.reporting(Recorder()) as seen:
        sweep("linux-6.1", [1, 2], ["linux", "mirror"], workload="syscall")
    assert seen.of("measuring NR_CPUS x designs") == [(n, 4) for n in range(5)]


def test_compare_reports_each_design():
    with progress.reporting(Recorder()) as seen:
        compare("kaiser-2017", 2, designs=["explicit", "linux"])
    assert seen.of("comparing designs") == [(0, 2), (1, 2), (2, 2)]


def test_without_a_reporter_steps_go_nowhere_and_items_pass_through():
    progress.step("nothing listens", 1, 2)
    assert list(progress.over(range(3), "counting")) == [0, 1, 2]


def test_reporting_ends_with_the_block():
    with progress.reporting(Recorder()) as seen:
        pass
    boot("linux-6.1", "linux", cpus=2)
    assert seen.steps == []
