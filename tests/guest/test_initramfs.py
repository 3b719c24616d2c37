"""The initramfs is a newc archive the real cpio(1) reads back as written, /dev/console included."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptilab.errors import InputError
from ptilab.guest import initramfs as ir

needs_cpio = pytest.mark.skipif(not shutil.which("cpio"), reason="no cpio(1)")

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=12).filter(
    lambda n: n not in (".", ".."))
trees = st.dictionaries(st.lists(names, min_size=1, max_size=3).map("/".join), st.binary(max_size=300), max_size=8)


def _unpack(archive: bytes, into: Path) -> str:
    into.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=archive, cwd=into,
                   check=True, capture_output=True)
    return subprocess.run(["cpio", "-tv", "--quiet"], input=archive, capture_output=True, check=True).stdout.decode()


@needs_cpio
@settings(max_examples=25, deadline=None)
@given(trees)
def test_cpio_reads_back_every_file_as_written(tmp_path_factory, files):
    # a path may not be both a file and a directory
    files = {p: d for p, d in files.items() if not any(q.startswith(p + "/") for q in files)
             and p not in ir.DIRECTORIES and p != "dev/console"}  # the archive's own entries
    root = tmp_path_factory.mktemp("x")
    listing = _unpack(ir.newc(files), root / "root")
    for path, data in files.items():
        assert (root / "root" / path).read_bytes() == data
    assert all(f"{d}\n" in listing for d in ir.DIRECTORIES)


@needs_cpio
def test_the_archive_holds_dev_console_without_root_and_an_executable_init(tmp_path):
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF\x02" + b"\0" * 59)  # ELF64 without program headers: no PT_INTERP
    archive = gzip.decompress(ir.initramfs("#!/bin/busybox sh\n", {"lib/m.ko": b"ko"}, busybox))
    listing = _unpack(archive, tmp_path / "root")
    console = next(line for line in listing.splitlines() if line.endswith("dev/console"))
    assert console.startswith("crw-------") and "5,   1" in console
    init = next(line for line in listing.splitlines() if line.endswith(" init"))
    assert init.startswith("-rwxr-xr-x")
    assert (tmp_path / "root" / "lib" / "m.ko").read_bytes() == b"ko"


def test_the_machines_busybox_is_static_or_refused_with_how_to_get_one():
    try:
        found = ir.static_busybox()
    except InputError as refused:
        assert "apt-get install busybox-static" in str(refused)
        return
    assert not ir._has_interpreter(found.read_bytes()[:1 << 16])


def test_a_dynamic_executable_is_not_a_busybox_for_the_guest():
    assert ir._has_interpreter(Path("/bin/sh").resolve().read_bytes()[:1 << 16])
