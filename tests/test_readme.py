"""The README's tour shows real output: every `$ ptilab ...` of its fenced
blocks is run, and the lines shown under it are held to what ptilab prints
by the convention of tests/readme_blocks.py: whole lines, in order, and
wherever the block leaves lines, rows or columns out, a "..." at that spot
that says so (and, where it gives a count, the right one). On the real-kernel
fixtures, whose addresses and sizes change from build to build, hexadecimal
numbers and MiB counts only have to be there, not be equal.

`python -m tests.readme_blocks --check` prints each command's fresh output
and what its block gets wrong: re-run it and paste."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import readme_blocks
from tests.readme_blocks import commands, problems, run
from tests.realkernel.conftest import real_kernel

ROOT = Path(__file__).resolve().parent.parent
TOUR = [c for c in commands() if c.runnable]
LIVE = ROOT / "tests" / "realkernel" / "out" / "live" / "live.txt"


def test_the_tour_has_commands_to_check():
    assert len(TOUR) >= 7, TOUR


@pytest.mark.parametrize("command", TOUR, ids=[c.text for c in TOUR])
def test_tour_output_is_what_ptilab_prints(command):
    for config in command.fixtures:
        real_kernel(config)  # built on demand, skipped or failed as the fixture tests are
    printed = run(command)
    assert printed.code == command.exit_shown, "\n".join(printed.lines[-3:])
    assert problems(command.output_shown, printed.lines, bool(command.fixtures)) == [], \
        f"README.md:{command.line} (python -m tests.readme_blocks --check prints the output)"


def test_the_live_block_is_what_the_guest_printed():
    """`sudo ptilab audit --live` runs inside the live guest (tests/realkernel/live.py), which saves
    what it printed as live.txt: the README's block is held to that, as the others to their runs."""
    live = [c for c in commands() if c.text == "sudo ptilab audit --live"]
    assert len(live) == 1
    if not LIVE.exists():
        pytest.skip(f"no {LIVE.relative_to(ROOT)}: python tests/realkernel/live.py --config live makes it")
    assert problems(live[0].output_shown, LIVE.read_text().splitlines(), volatile=True) == []


# -- the convention itself, on made-up output ------------------------------------------------

OUTPUT = """\
Findings of an example
severity  id       finding
critical  PTI-OFF  page-table isolation is off: the tables map
                   the whole kernel
high      EXEC     executable kernel code
medium    GLOBAL   global kernel pages
low       CEA      the fixed cpu_entry_area
total 4""".splitlines()


@pytest.mark.parametrize("shown", [
    OUTPUT,
    [*OUTPUT[:4], "... 3 more findings: EXEC, GLOBAL, CEA", "total 4"],
    [*OUTPUT[:3], "... 4 more lines", "total 4"],
    [*OUTPUT[:2], "critical  PTI-OFF  page-table isolation is off: ...", "... 3 more findings", "total 4"],
    [*OUTPUT[:2], "critical  PTI-OFF  ... the tables map", *OUTPUT[3:]],
    [*OUTPUT[:2], "critical  PTI-OFF  page-table isolation ...", "...", "total 4"],
    [*OUTPUT[:3], "..."],
    ["... 2 more lines", *OUTPUT[2:]],
    ["Findings of an example", "severity  id  ...", *OUTPUT[2:]],
])
def test_an_honest_block_passes(shown):
    assert problems(shown, OUTPUT) == []


@pytest.mark.parametrize("shown, why", [
    ([*OUTPUT[:3], *OUTPUT[5:]], "a finding dropped without a mark"),
    (OUTPUT[1:], "the title left out"),
    (OUTPUT[:-1], "the last line left out"),
    ([*OUTPUT[:4], "... 2 more findings", "total 4"], "a wrong count"),
    ([*OUTPUT[:3], "... 3 more lines", "total 4"], "a wrong line count"),
    ([*OUTPUT[:4], "... 3 more findings: EXEC, PTI-EXTRA", "total 4"], "naming what it does not stand for"),
    ([*OUTPUT[:3], "... 3 more findings", "total 4"], "a row's own continuation hidden under a count of other rows"),
    ([*OUTPUT[:2], "critical  PTI-OFF  page-table isolation is off:", *OUTPUT[3:]], "a line cut short unmarked"),
    ([*OUTPUT[:2], OUTPUT[2] + " ...", *OUTPUT[3:]], "a \"...\" where nothing is left out"),
    ([*OUTPUT[:6], "...", *OUTPUT[6:]], "a marker where nothing is left out"),
    ([OUTPUT[0], OUTPUT[2], OUTPUT[1], *OUTPUT[3:]], "lines out of order"),
    ([*OUTPUT[:5], "low  CEA  the fixed cpu_entry_area", "...", "total 4"], "a line that is not there"),
    (["severity  id  ...", *OUTPUT[2:]], "a partial header without the title"),
    ([*OUTPUT[:4], "... 3 000-odd more findings", "total 4"], "a count it cannot read"),
])
def test_a_block_that_drops_output_silently_fails(shown, why):
    assert problems(shown, OUTPUT) != [], why


def test_a_line_that_repeats_is_placed_where_the_rest_of_the_block_fits():
    printed = ["title", "x", "row", "x", "end"]
    assert problems(["title", "...", "x", "end"], printed) == []
    assert problems(["title", "x", "end"], printed) != []


def test_volatile_numbers_match_any_on_fixtures():
    printed = ["PGD pair: kernel 0x62ae000, user 0x62af000, 552 MiB mapped"]
    shown = ["PGD pair: kernel 0x611c000, user 0x611d000, 575 MiB mapped"]
    assert problems(shown, printed, volatile=True) == []
    assert problems(shown, printed) != []


def test_the_commands_are_read_from_every_fence_with_a_prompt():
    text = "```console\n$ ptilab a; echo \"exit $?\"\nout\nexit 1\n```\n```sh\n$ ptilab b  # why\nerr\n```\n"
    found = commands(text)
    assert [(c.text, c.output_shown, c.exit_shown, c.argv) for c in found] == [
        ('ptilab a; echo "exit $?"', ["out"], 1, ["a"]), ("ptilab b", ["err"], 0, ["b"])]
    assert readme_blocks.Command("sudo ptilab audit --live", 1).runnable is False


def test_the_docs_link_nothing_outside_the_repository():
    """A clone has README.md and docs/, not what sat beside the repository when it was written."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        assert "../shared" not in text and "/work/" not in text, path
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if "://" not in target:
                assert (path.parent / target).exists(), f"{path.name} links {target}, which is not in the repository"
