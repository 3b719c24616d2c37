"""Opening the user's files: never hang on one, never read what cannot be a memory image."""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

from ptilab.errors import InputError


def open_input(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a file to read. O_NONBLOCK on open(): a FIFO that no process
    writes to would block open() for ever; opened this way it reads as
    empty (no writer is end of file) and the caller says the file is empty.
    A pipe with a writer (`--ptdump <(ssh host cat ...)`) reads as usual."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise InputError(f"{os.fspath(path)}: cannot read: {err.strerror or err}") from None
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def require_image_file(path: str | os.PathLike[str]) -> None:
    """A memory image is mapped and read at offsets: it must be a regular file
    or a block device (a LiME dump written to a disk), not a pipe, a socket or
    a character device such as /dev/zero."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise InputError(f"{os.fspath(path)}: cannot read: {err.strerror or err}") from None
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return
    kind = ("a directory" if stat.S_ISDIR(mode) else "a pipe (FIFO)" if stat.S_ISFIFO(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "a character device" if stat.S_ISCHR(mode) else "not a file")
    raise InputError(f"{os.fspath(path)}: {kind}: a memory image must be a regular file or a block device")
