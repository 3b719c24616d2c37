import numpy as np
import pytest

from ptilab.errors import FrameOutsideMemory, InputError
from ptilab.memory.raw import RawImage
from ptilab.paging import walk
from tests.memory.test_elfcore import _ram_frames, _tree, frames, pfns
from ptilab.paging.geometry import FOUR_LEVEL


def test_frames_read_back_from_base_on(tmp_path):
    path = tmp_path / "ram.bin"
    path.write_bytes(frames(10, 11, 12))
    ram = RawImage(path, base=0x100000)
    assert ram.end == 0x103000
    assert ram.frames_present(pfns(0, 0xFF, 0x100, 0x102, 0x103)).tolist() == [False, False, True, True, False]
    got = ram.read_frames(pfns(0x102, 0x100))
    assert (got == np.frombuffer(frames(12, 10), "<u8").reshape(2, 512)).all()
    with pytest.raises(FrameOutsideMemory):
        ram.read_frames(pfns(0x103))
    with pytest.raises(FrameOutsideMemory):
        ram.read_frames(pfns(0))


def test_a_trailing_partial_frame_is_absent(tmp_path):
    path = tmp_path / "ram.bin"
    path.write_bytes(frames(1, 2) + b"\x01" * 100)
    ram = RawImage(path)
    assert ram.frames_present(pfns(0, 1, 2)).tolist() == [True, True, False]
    assert ram.end == 0x2000


def test_walk_sees_the_same_ranges_in_simulated_ram_and_a_raw_image(tmp_path):
    bump = _tree()
    path = tmp_path / "ram.bin"
    with open(path, "wb") as f:
        f.truncate(bump.ram.size)
        for pfn in _ram_frames(bump.ram):
            f.seek(pfn << 12)
            f.write(bump.ram.read_frame(pfn).tobytes())
    want = walk(bump.ram, 0x1000, FOUR_LEVEL)
    got = walk(RawImage(path), 0x1000, FOUR_LEVEL)
    assert (got.ranges == want.ranges).all() and len(want.mapped) == 6


@pytest.mark.parametrize("content, base, says", [
    (None, 0, "cannot read"),
    (b"", 0, "less than one"),
    (b"\0" * 4096, 0x800, "aligned"),
])
def test_bad_raw_images_are_input_errors(tmp_path, content, base, says):
    path = tmp_path / "ram.bin"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=says) as info:
        RawImage(path, base)
    assert str(path) in str(info.value)
