"""Where the CLI's output goes: rich tables and colour when stdout is a
terminal, plain aligned text (no box drawing, no ANSI codes) when it is not;
a progress bar on stderr when that is a terminal. Only the CLI imports this
module, and rich only when it draws a table, a line or a bar: plain text and
JSON (ptdump, info mem, --json) start without it. The library reports
progress through ptilab.progress and never draws anything itself.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import click

from ptilab import progress
from ptilab.errors import InputError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

PLAIN_WIDTH = 200  # not a terminal: wide enough that the tables do not fold


class Output:
    """The CLI's stdout and stderr for one run.

    color None follows the environment as rich does (a terminal, NO_COLOR,
    FORCE_COLOR); True forces the terminal look on any stdout; False keeps the
    layout and drops the colour. quiet drops progress and informational lines:
    results and errors only.
    """

    def __init__(self, quiet: bool = False, color: bool | None = None):
        self.quiet = quiet
        self.color = color

    @cached_property
    def stdout(self) -> "Console":
        from rich.console import Console  # 40 ms of import: only for what rich draws

        console = Console(soft_wrap=False, markup=False, force_terminal=True if self.color else None,
                          **self._styles())
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console.width = PLAIN_WIDTH
        return console

    @cached_property
    def stderr(self) -> "Console":
        from rich.console import Console

        return Console(stderr=True, markup=False, **self._styles())

    def _fitted(self, table: "Table") -> "Table":
        """The table within the console's width: columns set between words, or
        stacked a row per block where even that is too wide."""
        if _narrowest(table) > self.stdout.width:
            return _stacked(table)
        _fit_between_words(table, self.stdout.width)
        return table

    def _folded(self, text: str) -> list[str]:
        """A title or caption: whole, unless COLUMNS asks for a width."""
        if "COLUMNS" not in os.environ:
            return [text]
        import textwrap
        return textwrap.wrap(text, self.stdout.width, break_long_words=False) or [""]

    def _styles(self) -> dict:
        """--no-color and NO_COLOR (no-color.org) mean no escape codes at all: no colour, and no bold
        or italic either (rich's own no_color keeps those); the boxes are layout, not colour."""
        if self.color is False or (self.color is None and os.environ.get("NO_COLOR")):
            return {"no_color": True, "color_system": None}
        return {}

    @property
    def plain(self) -> bool:
        return not self.stdout.is_terminal

    def table(self, table: "Table") -> None:
        """A result table: boxed on a terminal; else aligned columns, rows of
        several lines set apart by a blank line instead of rules."""
        if not self.plain:
            self.stdout.print(self._fitted(table))
            return
        if "COLUMNS" in os.environ:  # asked for a width: kept to as on a terminal, words whole
            table = self._fitted(table)
        # The title and caption on lines of their own, so that the table's
        # width does not wrap them.
        title, caption = table.title, table.caption
        table.title = table.caption = None
        table.box = None
        table.pad_edge = False
        if table.show_lines:
            table.leading = 1
        with self.stdout.capture() as captured:
            self.stdout.print(table)
        lines = self._folded(str(title)) if title else []
        lines += [line.rstrip() for line in captured.get().splitlines()]
        lines += self._folded(str(caption)) if caption else []
        click.echo("".join(line + "\n" for line in lines), nl=False)

    def line(self, text: str) -> None:
        """A line of the result: folded to a terminal's width, whole into a pipe or file."""
        if self.plain:
            click.echo(text)
            return
        self.stdout.print(text)

    def info(self, text: str) -> None:
        """A line about what was done (a file written); --quiet drops it."""
        if not self.quiet:
            self.stdout.print(text, highlight=False)

    def text(self, text: str) -> None:
        """Preformatted output (ptdump, info mem), exactly as given."""
        click.echo(text, nl=False)

    def json(self, data) -> None:
        """The whole result as one JSON document: with --json nothing else goes to stdout."""
        click.echo(json.dumps(data, indent=2, default=lambda o: getattr(o, "value", str(o))))

    @contextmanager
    def progress(self) -> Iterator[None]:
        """Draw the library's progress steps as bars on stderr, if that is a
        terminal and not --quiet; else let them go nowhere. FORCE_COLOR does
        not count: CI sets it, and its logs want no bars."""
        if self.quiet or not _isatty(sys.stderr):
            yield
            return
        bars = ProgressBars(self.stderr)
        with bars.progress, progress.reporting(bars):
            yield

    @contextmanager
    def busy(self, what: str) -> Iterator[None]:
        """One step of unknown length (walking a large image) as a pulsing bar."""
        progress.step(what, 0, None)
        yield
        progress.step(what, 1, 1)


def _longest_word(cells) -> int:
    return max((len(word) for cell in cells for word in str(cell).split()), default=0)


def _narrowest(table: Table) -> int:
    """The width the table needs for no cell to break a word: each column as
    wide as its longest word, plus padding and rules."""
    return sum(_longest_word([c.header, *c.cells]) + 2 for c in table.columns) + len(table.columns) + 1


def _fit_between_words(table: Table, width: int) -> None:
    """Set each column's width so that none is below its longest word (rich
    would otherwise squeeze one and break a word): the room left over goes to
    the columns whose text is longer than that, in proportion."""
    least = [_longest_word([c.header, *c.cells]) for c in table.columns]
    most = [max(len(line) for cell in [c.header, *c.cells] for line in str(cell).splitlines() or [""])
            for c in table.columns]
    room = width - len(table.columns) - 1 - 2 * len(table.columns) - sum(least)
    want = [m - lo for m, lo in zip(most, least)]
    if sum(want) <= room:
        return  # rich's own layout fits every cell on one line
    for column, lo, extra in zip(table.columns, least, want):
        column.width = lo + room * extra // sum(want)


def _stacked(table: Table) -> Table:
    """A table too wide for the terminal as one block per row, column name
    beside its value: values wrap between words, never inside one."""
    from rich.table import Table

    out = Table(title=table.title, caption=table.caption, show_header=False, box=table.box)
    out.add_column(style="bold", no_wrap=True)
    out.add_column(overflow="fold")
    rows = list(zip(*(list(c.cells) for c in table.columns)))
    for i, row in enumerate(rows):
        for column, cell in zip(table.columns, row):
            out.add_row(str(column.header), cell)
        if i < len(rows) - 1:
            out.add_section()
    return out


class ProgressBars:
    """A ptilab.progress reporter: one transient bar per kind of work under way."""

    def __init__(self, console: "Console"):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn)

        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True,
                                 redirect_stdout=False, redirect_stderr=False)  # results stay on stdout
        self.tasks: dict[str, int] = {}

    def step(self, what: str, done: int, total: int | None) -> None:
        task = self.tasks.get(what)
        if task is None:
            self.tasks[what] = task = self.progress.add_task(what, total=total, completed=done)
        else:
            self.progress.update(task, completed=done, total=total)
        if total is not None and done >= total:
            self.progress.remove_task(task)
            del self.tasks[what]


FILE_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
              stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}


def output_target(path: str) -> Path:
    """The regular file that writing path replaces: path itself, or the file a
    symlink leads to (the link stays a link). Refused with one line, before any
    work: '' and '-' (ptilab writes files, not stdout), and anything that is not
    a regular file or absent (a device, a FIFO, a directory): replacing those by
    a rename would destroy them, and writing into them is not writing a file."""
    if path == "":
        raise InputError("the output file name is empty")
    if path == "-":
        raise InputError("'-': ptilab writes a file, not stdout; give a file name (./- for a file named '-')")
    target = Path(os.path.realpath(path))
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target
    except OSError as err:
        raise InputError(f"{path}: cannot write: {err.strerror or err}") from None
    if not stat.S_ISREG(mode):
        kind = FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise InputError(f"{path}: is {kind}; ptilab writes only a regular file or a new one")
    return target


@contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """A temporary file next to path for the block to fill, renamed over path
    when the block ends and removed if it fails: a reader sees the old file or
    the whole new one, never half of one. path must be a regular file or absent
    (output_target); a symlink's target is what gets replaced. The temporary is
    made at once, so an unwritable place is refused before any work is done."""
    target = output_target(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=f".tmp{target.suffix}")
    except OSError as err:
        raise InputError(f"{path}: cannot write: {err.strerror or err}") from None
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 is for the temporary only
        os.replace(tmp, target)
    except OSError as err:
        raise InputError(f"{path}: cannot write: {err.strerror or err}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
