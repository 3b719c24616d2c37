"""The CLI's output: progress bars only where someone watches, files whole or not at all."""

import io
import os

import pytest
from rich.console import Console

from ptilab import progress
from ptilab.errors import InputError
from ptilab.pti import boot
from ptilab.terminal import Output, ProgressBars, atomic_file
from tests.realkernel.conftest import real_kernel


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


def _modules_loaded(code: str) -> set[str]:
    """The non-standard-library modules a fresh `python -c code` has loaded when code ends."""
    import json
    import subprocess
    import sys

    code += "\nimport json, sys; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {m for m in json.loads(done.stdout.splitlines()[-1]) if m.split(".")[0] not in sys.stdlib_module_names}


def test_cli_starts_without_the_heavy_libraries():
    """`ptilab --help` imports neither rich, matplotlib nor numpy: each costs
    tens of ms of start-up (bench/startup.py times it; this pins what is imported)."""
    heavy = {"rich", "matplotlib", "numpy", "elftools"}
    assert not {m.split(".")[0] for m in _modules_loaded("import ptilab.cli")} & heavy


def test_a_dump_loads_only_what_bench_startup_times():
    """`ptilab dump CORE --format qemu` of a real core loads no rich, matplotlib,
    pyelftools, numba or dask, and nothing bench/startup.py's dump-imports row
    does not import: the row times the whole import part of the command."""
    from bench.startup import DUMP_IMPORTS

    k = real_kernel("pti-4level")
    run = ("import runpy, sys\n"
           f"sys.argv = ['ptilab', 'dump', {str(k.path / 'core.elf')!r}, '--format', 'qemu']\n"
           "try:\n    runpy.run_module('ptilab.cli', run_name='__main__')\nexcept SystemExit as ex:\n"
           "    assert not ex.code, ex.code")
    dump = _modules_loaded(run)
    assert "ptilab.formats.qemu" in dump and "ptilab.memory.elfcore" in dump
    assert not {m.split(".")[0] for m in dump} & {"rich", "matplotlib", "elftools", "numba", "dask", "distributed"}
    assert "numpy.ma" not in dump  # np.unique imports it (~12 ms): the walk has its own sorted_unique
    assert dump - _modules_loaded(DUMP_IMPORTS) == set()


def _words_intact(table_factory, width: int, monkeypatch) -> list[str]:
    """The cell words that a terminal of this width shows broken."""
    import re

    monkeypatch.setenv("COLUMNS", str(width))
    out = Output(color=True)
    table = table_factory()
    words = {w for c in table.columns for cell in [c.header, *c.cells] for w in str(cell).split()}
    with out.stdout.capture() as captured:
        out.table(table)
    shown = re.sub(r"\x1b\[[0-9;]*m", "", captured.get())
    return sorted(w for w in words if w not in shown)


@pytest.mark.parametrize("width", [80, 100, 132])
@pytest.mark.parametrize("what", ["compare", "cost", "layout-change"])
def test_no_table_splits_a_word_at_80_columns_or_more(monkeypatch, width, what):
    from ptilab.report import tables

    def compare():
        from ptilab.compare.metrics import compare
        return tables.compare_table(compare("linux-6.1", 4, 4))

    def cost():
        from ptilab.mmu.cost import sweep
        return tables.refill_table(sweep("linux-6.1", [4], ["linux", "off"], 4, ["context-switch"], True, 0))

    def layout_change():
        from ptilab.compare.layout_change import run
        return tables.layout_change_table(run("kaiser-2017", 2, 4), "kaiser-2017")
    assert _words_intact({"compare": compare, "cost": cost, "layout-change": layout_change}[what], width,
                         monkeypatch) == []


def test_a_long_result_line_reaches_a_pipe_whole_and_a_terminal_folded(capsys):
    long = "CPU: " + "evidence " * 60
    Output().line(long)  # pytest's capture is no terminal: as into a pipe
    assert capsys.readouterr().out == long + "\n"
    term = Output(color=True)
    term.stdout.file, term.stdout.width = io.StringIO(), 80
    term.line(long)
    folded = term.stdout.file.getvalue().splitlines()
    assert len(folded) > 1 and max(len(x) for x in folded) <= 80


def test_a_piped_table_keeps_to_columns_when_it_is_set(monkeypatch, capsys):
    from ptilab.compare.metrics import compare
    from ptilab.report import tables

    def widest() -> int:
        Output().table(tables.compare_table(compare("linux-6.1", 4, 4)))
        return max(len(line) for line in capsys.readouterr().out.splitlines())

    monkeypatch.delenv("COLUMNS", raising=False)
    unset = widest()  # not a terminal: wide enough that no row folds
    monkeypatch.setenv("COLUMNS", "100")
    assert widest() <= 100 < unset
