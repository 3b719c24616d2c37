"""Text files read a line at a time, in memory bounded whatever the file.

Every text reader (ptdump, System.map/kallsyms, QEMU monitor text, workload
TOML) opens its file here. The first kilobyte decides whether it is text at
all: a NUL byte, bytes that are not UTF-8, or control characters mean a
binary file (a core, an image) handed to a text reader, refused in one line
instead of parsed, or echoed into the terminal. After that, lines are read one
at a time and none may be longer than MAX_LINE, so a file of any size, text
at its start and random bytes after, holds at most one line in memory.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path
from typing import Iterator

from ptilab.errors import InputError
from ptilab.files import open_input

SNIFF = 1024
MAX_LINE = 4096  # ptdump, kallsyms and monitor lines are under 200 characters
_CONTROL = set(range(32)) - {9, 10, 12, 13}  # tab, newline, form feed and CR are text


def check_text(head: bytes, source: str, what: str) -> None:
    """Refuse a file whose first bytes are not text, saying what they look like."""
    head = head[:SNIFF]
    nul = head.find(b"\0")
    looks = _looks_like(head)
    if nul >= 0:
        raise InputError(f"{source}: binary data, not {what} ({looks or f'a NUL byte at offset {nul}'})")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as err:
        raise InputError(f"{source}: binary data, not {what} ({looks or f'not UTF-8 at offset {err.start}'})") \
            from None
    control = next((i for i, b in enumerate(head) if b in _CONTROL), None)
    if control is not None:
        raise InputError(f"{source}: binary data, not {what} ({looks or f'control byte {head[control]:#04x} at offset {control}'})")


def _looks_like(head: bytes) -> str:
    """What a binary file's first bytes say it is, when they say."""
    if head.startswith(b"\x7fELF"):
        return "an ELF file: give it as IMAGE"
    if head.startswith(b"KDUMP   ") or head.startswith(b"DISKDUMP"):
        return "a kdump-compressed dump"
    if head.startswith(b"EMiL"):
        return "a LiME memory image"
    return ""


def describe_text(head: bytes) -> str:
    """What a text file's first lines look like, in a few words."""
    text = head.decode("utf-8", "replace")
    first = next((line for line in text.splitlines() if line.strip()), "")
    if first.startswith("---[") or re.match(r"0x[0-9a-f]{16}-0x[0-9a-f]{16} ", first):
        return "it looks like Linux ptdump text: give it with --ptdump"
    if re.match(r"[0-9a-f]{8,16} [a-zA-Z] \S", first):
        return "it looks like a System.map or kallsyms: give it with --system-map"
    if re.match(r"[0-9a-f]{16}(-[0-9a-f]{16} |: )", first):
        return "it looks like QEMU monitor text"
    return f"it starts {first[:40]!r}"


def read_lines(path: str | Path, what: str) -> Iterator[tuple[int, str]]:
    """(line number, line without its end) for each line of a text file,
    after check_text() on its first kilobyte; a line longer than MAX_LINE
    bytes is an error. Undecodable bytes past the first kilobyte become
    U+FFFD, which no reader accepts, so the line is refused by its parser."""
    with open_input(path) as f:
        try:
            check_text(f.peek(SNIFF)[:SNIFF], str(path), what)
            for number, raw in enumerate(iter(lambda: f.readline(MAX_LINE + 1), b""), 1):
                if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
                    raise InputError(f"{path}:{number}: a line longer than {MAX_LINE} bytes: not {what}")
                yield number, raw.decode("utf-8", "replace").rstrip("\r\n")
        except OSError as err:
            raise InputError(f"{path}: cannot read: {err.strerror or err}") from None


def read_small_text(path: str | Path, what: str, limit: int = 1 << 20) -> str:
    """A whole text file that has no business being large (a workload's
    TOML): refused if it is over limit bytes or not text."""
    try:
        with open_input(path) as f:
            data = f.read(limit + 1)
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err.strerror or err}") from None
    if len(data) > limit:
        raise InputError(f"{path}: larger than {limit >> 10} KiB: not {what}")
    check_text(data, str(path), what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 at offset {err.start}: not {what}") from None


def lines_of(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of text already in memory, as read_lines() gives a file's."""
    return enumerate(text.splitlines(), 1)
