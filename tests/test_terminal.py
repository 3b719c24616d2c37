"""The CLI's output: progress bars only where someone watches, files whole or not at all."""

import io
import os

import pytest
from rich.console import Console

from ptilab import progress
from ptilab.errors import InputError
from ptilab.linux.kernel import boot
from ptilab.terminal import Output, ProgressBars, atomic_file


def test_progress_bars_follow_the_library_steps_and_go_when_done():
    bars = ProgressBars(Console(file=io.StringIO(), force_terminal=True))
    seen = []
    real_step = bars.step

    def step(what, done, total):
        real_step(what, done, total)
        seen.append({t.description: t.completed for t in bars.progress.tasks})
    bars.step = step
    with progress.reporting(bars):
        boot("linux-6.1", "linux", cpus=3)
    assert seen == [{"booting APs": 0}, {"booting APs": 1}, {}]
    assert not bars.progress.tasks


def test_no_bars_when_stderr_is_not_a_terminal_or_quiet(capsys):
    for out in (Output(), Output(quiet=True)):
        with out.progress():
            progress.step("booting APs", 0, 2)
            assert progress._reporter.get() is None
    assert capsys.readouterr().err == ""


def test_an_atomic_file_appears_whole_when_the_block_ends(tmp_path):
    target = tmp_path / "out.html"
    target.write_text("old")
    with atomic_file(str(target)) as tmp:
        assert target.read_text() == "old"
        with open(tmp, "w") as f:
            f.write("new")
    assert target.read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["out.html"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_an_atomic_file_that_fails_leaves_nothing_and_the_old_file(tmp_path):
    target = tmp_path / "out.html"
    target.write_text("old")
    with pytest.raises(InputError), atomic_file(str(target)) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise InputError("the work failed")
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out.html"]


def test_an_unwritable_place_is_refused_at_once(tmp_path):
    with pytest.raises(InputError, match="cannot write: No such file or directory"):
        with atomic_file(str(tmp_path / "nodir" / "out.html")):
            pytest.fail("the block must not run")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("modules", ["ptilab.cli", "ptilab.cli, ptilab.paging, ptilab.memory.images, ptilab.formats.qemu"])
def test_cli_and_a_dump_start_without_the_heavy_libraries(modules):
    """`ptilab --help` and `ptilab dump --format qemu` import neither rich nor
    matplotlib (numpy only where the walk needs it): each costs tens of ms
    of start-up (bench/startup.py times it; this only pins what is imported)."""
    import subprocess
    import sys

    heavy = ["rich", "matplotlib"] + (["numpy"] if modules == "ptilab.cli" else [])
    code = f"import sys, {modules}; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""
