"""The initramfs a guest boots: a gzip'd newc cpio archive around a static busybox.

newc is the archive the kernel unpacks into its rootfs (init/initramfs.c;
usr/gen_init_cpio.c writes it): per entry a 110-byte ASCII header "070701" and
13 eight-digit hex fields, the NUL-terminated name, the data, each padded to 4
bytes; "TRAILER!!!" ends it. Written here rather than by cpio(1), so the
archive can hold /dev/console without root (no mknod).
"""

from __future__ import annotations

import gzip
import stat
import struct
from pathlib import Path
from typing import Mapping

from ptilab.errors import InputError

BUSYBOX_PATHS = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
DIRECTORIES = ("bin", "dev", "proc", "sys", "tmp")
PT_INTERP = 3
CONSOLE = (5, 1)  # /dev/console: TTYAUX_MAJOR 5, minor 1 (Documentation/admin-guide/devices.txt)


def static_busybox() -> Path:
    """The machine's static busybox; one line saying how to get it when there is none.

    A dynamically linked busybox (Debian's `busybox`) would need the host's libc
    in the guest: a static one runs alone."""
    for path in BUSYBOX_PATHS:
        if path.is_file() and not _has_interpreter(path.read_bytes()[:1 << 16]):
            return path
    raise InputError("no static busybox at /bin/busybox for the guest's initramfs: "
                     "apt-get install busybox-static")


def _has_interpreter(head: bytes) -> bool:
    """The ELF64 file asks for a dynamic loader (a PT_INTERP program header)."""
    if head[:4] != b"\x7fELF" or head[4] != 2:
        return True  # not an ELF64 executable: not a busybox the guest can run either
    phoff, = struct.unpack_from("<Q", head, 32)
    phentsize, phnum = struct.unpack_from("<HH", head, 54)
    return any(struct.unpack_from("<I", head, phoff + i * phentsize)[0] == PT_INTERP
               for i in range(phnum) if phoff + (i + 1) * phentsize <= len(head))


def _entry(ino: int, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> bytes:
    fields = (ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data), 0, 0, *rdev, len(name) + 1, 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    return _pad(head) + _pad(data)


def _pad(chunk: bytes) -> bytes:
    return chunk + b"\0" * (-len(chunk) % 4)


def newc(files: Mapping[str, bytes], executable: set[str] = frozenset()) -> bytes:
    """A newc archive of files (path -> bytes) with their parent directories,
    the standard ones (bin dev proc sys tmp) and /dev/console; owner root."""
    dirs = set(DIRECTORIES)
    for path in files:
        parts = path.split("/")[:-1]
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    entries = [(d, stat.S_IFDIR | 0o755, b"", (0, 0)) for d in sorted(dirs)]
    entries.append(("dev/console", stat.S_IFCHR | 0o600, b"", CONSOLE))
    entries += [(p, stat.S_IFREG | (0o755 if p in executable else 0o644), data, (0, 0))
                for p, data in sorted(files.items())]
    body = b"".join(_entry(ino, name, mode, data, rdev) for ino, (name, mode, data, rdev) in enumerate(entries, 1))
    return body + _entry(0, "TRAILER!!!", 0)


def initramfs(init: str, files: Mapping[str, bytes] = {}, busybox: Path | None = None) -> bytes:
    """The gzip'd initramfs: /init (a busybox sh script), /bin/busybox, and files."""
    busybox = busybox or static_busybox()
    everything = {**files, "init": init.encode(), "bin/busybox": busybox.read_bytes()}
    return gzip.compress(newc(everything, {"init", "bin/busybox"}), compresslevel=6)
