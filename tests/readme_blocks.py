"""The README's console blocks, what their commands print, and whether a block
shows that honestly (tests/test_readme.py holds the README to it).

A console block is a fenced block whose lines start with `$ ` for a command;
the lines under a command are what it prints (stdout, then stderr), in order:

- A shown line is a whole line of the output, whitespace aside.
- "..." inside a shown line stands for text left out at that spot (words,
  middle columns), at its end for the rest of the line (trailing columns, the
  rest of a finding's text); a shown line ending in "..." also covers the
  indented lines under it that continue the same table row.
- A line that starts with "..." is a marker: whole lines left out at that spot.
  `... N [more] lines[: what]` stands for exactly N lines; `... N [more] UNITS[: what]`
  (findings, rows, roots, ranges, ...) for exactly N records, a record being
  a line that starts in the output's first column with the indented lines
  under it. `... what` without a number stands for at least one line. Finding
  ids a marker names (PTI-OFF, USER-VIEW-GLOBAL) must be among the lines it
  stands for.
- Nothing else is left out: the first shown line is the output's first, each
  next one the next output line unless a marker stands between them, and the
  last one the output's last (a block that stops early ends with a marker).
- `exit N`, under a command run as `CMD; echo "exit $?"`, is its exit status.
- On the real-kernel fixtures (tests/realkernel/out/...), hexadecimal numbers
  (with their sign: a shift "by +0x..." may be "by -0x..." next time),
  VMCOREINFO's KERNELOFFSET and MiB sizes, which move from one build of the
  fixtures to the next, match any; markers stand without a count where the
  count moves too.

    python -m tests.readme_blocks           # each README command and its fresh output, to paste
    python -m tests.readme_blocks --check   # and, under each, what its block gets wrong
    python -m tests.readme_blocks scan      # only the commands containing "scan"

Blocks with a `$ ` command that is not ptilab's own (`sudo ptilab ...`, a
build step) are listed, not run.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FIXTURE = re.compile(r"tests/realkernel/out/([\w.-]+)/")
EXIT = re.compile(r"exit (\d+)")
# `... 3 more findings: ...`: a count, then what it counts.
COUNTED = re.compile(r"\.\.\.\s+(\d+)\s+(?:more\s+)?([a-z]\w*)")
FINDING_ID = re.compile(r"\b[A-Z][A-Z0-9]+(?:-[A-Z0-9]+)+\b")
# What "..." inside a line stands for: at least one character that is not a space.
LEFT_OUT = r"\s*\S.*?\s*"
LEFT_OUT_AT_END = r"\s*\S.*"


@dataclass
class Command:
    """A `$ ` line of a README console block and the lines shown under it."""

    text: str
    line: int  # README line of the `$ `
    shown: list[str] = field(default_factory=list)

    @property
    def runnable(self) -> bool:
        return self.text.startswith("ptilab ")

    @property
    def argv(self) -> list[str]:
        """ptilab's arguments: the shell's `; echo "exit $?"` is not ptilab's."""
        return shlex.split(self.text.split(";")[0])[1:]

    @property
    def fixtures(self) -> list[str]:
        return FIXTURE.findall(self.text)

    @property
    def exit_shown(self) -> int:
        return next((int(m.group(1)) for line in self.shown if (m := EXIT.fullmatch(line.strip()))), 0)

    @property
    def output_shown(self) -> list[str]:
        return [line for line in self.shown if not EXIT.fullmatch(line.strip())]


def commands(text: str | None = None) -> list[Command]:
    """Every `$ ` command of the README's fenced blocks, in README order."""
    text = README.read_text() if text is None else text
    found: list[Command] = []
    fence: str | None = None
    current: Command | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            current = None
        elif fence is not None and line.startswith("$ "):
            current = Command(line[2:].split("  #")[0].rstrip(), number)
            found.append(current)
        elif current is not None:
            current.shown.append(line)
    return found


@dataclass
class Printed:
    code: int
    lines: list[str]


def run(command: Command) -> Printed:
    """Run a ptilab command in this process as a user's pipe would see it
    (plain text, no colour), from the repository's root."""
    from ptilab.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.pop(k) for k in ("FORCE_COLOR", "NO_COLOR", "COLUMNS") if k in os.environ}
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(command.argv)
                code = 0
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else 1
    finally:
        os.chdir(cwd)
        os.environ.update(saved)
    return Printed(code, (out.getvalue() + err.getvalue()).splitlines())


# -- holding a block to the output ------------------------------------------------------------


def _words(text: str) -> str:
    return " ".join(text.split())


def _escaped(fragment: str, volatile: bool) -> str:
    pattern = re.escape(_words(fragment))
    if volatile:
        pattern = re.sub(r"(?:\\[+-])?0x[0-9a-f]+", r"[+-]?0x[0-9a-f]+", pattern)  # a shift's sign moves too
        pattern = re.sub(r"KERNELOFFSET=[0-9a-f]+", r"KERNELOFFSET=[0-9a-f]+", pattern)
        pattern = re.sub(r"\d+\\ MiB", r"\\d+\\ MiB", pattern)
    return pattern


@dataclass
class Shown:
    """A shown output line: the pattern it must match whole, and whether it
    ends in "..." (open: the rest of the line and of its row left out)."""

    text: str
    pattern: re.Pattern
    open: bool


@dataclass
class Marker:
    """A `...` line: lines left out at its spot, so many of them if it says."""

    text: str
    count: int | None
    unit: str | None
    ids: list[str]

    def covers(self, lines: list[str], starts: list[bool], a: int, b: int) -> bool:
        """Whether output lines [a, b) are what this marker says it stands for."""
        if b <= a:
            return False
        if self.count is not None:
            if self.unit in ("line", "lines"):
                if b - a != self.count:
                    return False
            elif not (starts[a] and (b == len(lines) or starts[b]) and sum(starts[a:b]) == self.count):
                return False
        left_out = "\n".join(lines[a:b])
        return all(re.search(rf"\b{re.escape(i)}\b", left_out) for i in self.ids)


def parse(shown: list[str], volatile: bool) -> list[Shown | Marker]:
    items: list[Shown | Marker] = []
    for line in shown:
        stripped = line.strip()
        if stripped.startswith("..."):
            counted = COUNTED.match(stripped)
            if not counted and re.match(r"\.\.\.\s*\d", stripped):
                raise ValueError(f"a marker that starts with a number but not `N [more] UNITS`: {stripped!r}")
            items.append(Marker(stripped, int(counted.group(1)) if counted else None,
                                counted.group(2) if counted else None, FINDING_ID.findall(stripped)))
            continue
        fragments = stripped.split("...")
        pattern = LEFT_OUT.join(_escaped(f, volatile) for f in fragments[:-1])
        last = _escaped(fragments[-1], volatile)
        opened = len(fragments) > 1 and not last
        pattern = pattern + (LEFT_OUT_AT_END if opened else (LEFT_OUT if len(fragments) > 1 else "") + last)
        items.append(Shown(stripped, re.compile(pattern), opened))
    return items


@dataclass
class _Output:
    """The printed lines as the check reads them: words collapsed, and which lines start a record."""

    lines: list[str]

    def __post_init__(self) -> None:
        self.words = [_words(line) for line in self.lines]
        self.starts = [bool(line) and not line[0].isspace() for line in self.lines]

    def continued(self, p: int) -> int:
        """The first output line from p on that does not continue a table row."""
        while p < len(self.lines) and not self.starts[p]:
            p += 1
        return p

    def follows(self, p: int, was_open: bool, marker: Marker | None, q: int) -> bool:
        """Whether output line q (len(lines): the end) may be the next one shown, when
        the last one shown ended at p: straight on, past the rest of an open row,
        or past what a marker stands for."""
        for s in range(p, (self.continued(p) if was_open else p) + 1):
            if (q == s) if marker is None else marker.covers(self.lines, self.starts, s, q):
                return True
        return False


def problems(shown: list[str], printed: list[str], volatile: bool = False) -> list[str]:
    """What a block's shown lines get wrong about the output (empty: nothing).

    Each shown line is placed on an output line, in order; the output lines
    between two placed ones (and before the first, after the last) must be
    the continuation of an open line or stand under a marker that says so.
    Every placement that fits is followed, so a line that repeats cannot
    mislead it.
    """
    try:
        items = parse(shown, volatile)
    except ValueError as unreadable:
        return [str(unreadable)]
    out = _Output(printed)
    n = len(printed)
    positions = {0}  # where the next output line to account for may be
    was_open = False
    marker: Marker | None = None
    for item in items:
        if isinstance(item, Marker):
            if marker is not None:
                return [f"two markers in a row: {marker.text!r}, {item.text!r}"]
            marker = item
            continue
        targets = [q for q in range(n) if item.pattern.fullmatch(out.words[q])]
        if not targets:
            return [f"not a line of the output: {item.text!r}"]
        following = {q + 1 for p in positions for q in targets if out.follows(p, was_open, marker, q)}
        if not following:
            where = min(positions)
            told = f"after the marker {marker.text!r}" if marker else "as the next output line"
            actual = printed[where] if where < n else "(the end of the output)"
            return [f"{item.text!r} is not where the block puts it ({told}); output line {where + 1} is {actual!r}"]
        positions, was_open, marker = following, item.open, None
    if any(out.follows(p, was_open, marker, n) for p in positions):
        return []
    where = min(positions)
    if marker is not None:
        return [f"the marker {marker.text!r} does not stand for the {n - where} line(s) it ends the block on"]
    return [f"the output goes on after the block's last line, unmarked: {n - where} more line(s), "
            f"from {printed[where]!r}"]


def main(argv: list[str]) -> int:
    check = "--check" in argv
    wanted = [a for a in argv if a != "--check"]
    wrong = 0
    for command in commands():
        if wanted and not any(w in command.text for w in wanted):
            continue
        print(f"# README.md:{command.line}")
        if not command.runnable:
            print(f"$ {command.text}    (not run here)\n")
            continue
        printed = run(command)
        print(f"$ {command.text}")
        print("\n".join(printed.lines))
        if ";" in command.text:
            print(f"exit {printed.code}")
        if check:
            found = problems(command.output_shown, printed.lines, bool(command.fixtures))
            if printed.code != command.exit_shown:
                found.insert(0, f"exits {printed.code}, the block says {command.exit_shown}")
            wrong += bool(found)
            for problem in found:
                print(f"!! {problem}")
        print()
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
