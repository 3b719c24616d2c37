"""LiME dumps: range headers, and the broken files LiME never writes."""

import struct

import numpy as np
import pytest

from ptilab.errors import FrameOutsideMemory, InputError
from ptilab.memory.images import open_image
from ptilab.memory.lime import LimeImage
from tests.memory.dumpfiles import lime_bytes

LOW = bytes(range(256)) * 16 * 4          # 4 frames at 0
HIGH = np.arange(1024, dtype=np.uint64).tobytes()  # 2 frames at 1 MiB


def _lime(tmp_path, data: bytes):
    path = tmp_path / "mem.lime"
    path.write_bytes(data)
    return path


def test_ranges_hold_their_frames_and_nothing_else(tmp_path):
    dump = open_image(_lime(tmp_path, lime_bytes([(0, LOW), (0x100000, HIGH)])))
    assert isinstance(dump, LimeImage)
    assert dump.segments == [(0, 0x4000), (0x100000, 0x102000)]
    pfns = np.array([0, 3, 4, 0xFF, 0x100, 0x101, 0x102], np.uint64)
    assert dump.frames_present(pfns).tolist() == [True, True, False, False, True, True, False]
    assert dump.read_frames(np.array([1, 0x101], np.uint64)).tobytes() == LOW[4096:8192] + HIGH[4096:]
    with pytest.raises(FrameOutsideMemory):
        dump.read_frame(4)
    assert dump.cpus == () and dump.vmcoreinfo_text == ""


def test_ranges_out_of_order_are_read_in_address_order(tmp_path):
    dump = open_image(_lime(tmp_path, lime_bytes([(0x100000, HIGH), (0, LOW)])))
    assert dump.read_frame(0x100).tobytes() == HIGH[:4096]


@pytest.mark.parametrize("ranges, words", [
    ([(0, LOW), (0x2000, HIGH)], "ranges 0x0-0x3fff and 0x2000-0x3fff overlap"),
    ([(0x100000, HIGH), (0xFF000, HIGH)], "overlap"),
])
def test_overlapping_ranges_are_refused(tmp_path, ranges, words):
    with pytest.raises(InputError, match=words):
        open_image(_lime(tmp_path, lime_bytes(ranges)))


def _edit(fmt: str, at: int, value: int):
    def edit(data: bytearray) -> bytearray:
        struct.pack_into(fmt, data, at, value)
        return data
    return edit


@pytest.mark.parametrize("edit, words", [
    (_edit("<I", 32 + len(LOW), 0x12345678), "no LiME magic at file offset 0x4020"),
    (_edit("<I", 4, 2), "version 2"),
    (_edit("<Q", 16, 0xFFFF), "past the end of the file"),
    (_edit("<Q", 8, 0x5000), "ends .* before it starts"),
    (lambda d: d[:-1], "past the end of the file .* truncated"),
    (lambda d: d + b"\0" * 7, "7 stray bytes .* truncated"),
])
def test_broken_headers_are_refused_with_the_offset(tmp_path, edit, words):
    data = edit(bytearray(lime_bytes([(0, LOW), (0x100000, HIGH)])))
    with pytest.raises(InputError, match=words):
        open_image(_lime(tmp_path, bytes(data)))


def test_the_cli_refuses_overlapping_lime_ranges_in_one_line(tmp_path):
    import subprocess
    import sys

    path = _lime(tmp_path, lime_bytes([(0, LOW), (0x3000, HIGH)]))
    done = subprocess.run([sys.executable, "-m", "ptilab.cli", "audit", str(path), "--cr3", "0"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"ptilab: error: {path}: LiME ranges 0x0-0x3fff and 0x3000-0x4fff overlap\n"
