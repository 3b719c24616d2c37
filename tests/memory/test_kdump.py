"""kdump-compressed dumps: makedumpfile's diskdump layout, its compressions, laziness, and broken files."""

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptilab.errors import FrameOutsideMemory, InputError
from ptilab.memory.elfwrite import qemu_cpu_note
from ptilab.memory.images import open_image
from ptilab.memory.kdump import KdumpCompressed
from tests.memory.dumpfiles import COMPRESS, flatten, kdump_bytes, write_kdump

VMCOREINFO = "OSRELEASE=6.1.0-test\nNUMBER(phys_base)=0\nSYMBOL(init_top_pgt)=ffffffff80003000\n"


def _page(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    # Half structure, half noise: compressible, but not to nothing.
    return (np.arange(512, dtype=np.uint64) * np.uint64(seed + 1)).tobytes()[:2048] + rng.bytes(2048)


FRAMES = {0: bytes(4096), 3: _page(3), 4: _page(4), 70: _page(70), 4095: _page(4095)}


@pytest.mark.parametrize("flattened", [False, True], ids=["plain", "flattened"])
@pytest.mark.parametrize("compression", sorted(COMPRESS))
def test_every_compression_reads_back_the_frames_it_holds(tmp_path, compression, flattened):
    path = write_kdump(tmp_path / "d.kdump", FRAMES, 4096, compression=compression, flattened=flattened,
                       existing=[5, 6], vmcoreinfo=VMCOREINFO, notes=[qemu_cpu_note(cr3=0x3000)])
    dump = open_image(path)
    assert isinstance(dump, KdumpCompressed) and dump.flattened == flattened
    pfns = np.array(sorted(FRAMES), dtype=np.uint64)
    assert dump.frames_present(np.array([0, 3, 5, 6, 7, 4095, 4096, 1 << 40], np.uint64)).tolist() == \
        [True, True, False, False, False, True, False, False]
    assert dump.read_frames(pfns).tobytes() == b"".join(FRAMES[int(p)] for p in pfns)
    assert dump.release == "6.1.0-test" and dump.end == 4096 << 12
    assert dump.vmcoreinfo.osrelease == "6.1.0-test" and dump.cpus[0].cr3 == 0x3000


def test_an_excluded_frame_is_absent_not_zero(tmp_path):
    # makedumpfile -d 31 leaves free and user pages in the first bitmap only:
    # nothing is known of their bytes, so reading one is an error, as in crash.
    dump = open_image(write_kdump(tmp_path / "d.kdump", FRAMES, 4096, existing=[5]))
    with pytest.raises(FrameOutsideMemory, match="0x5000"):
        dump.read_frames(np.array([5], np.uint64))


def test_frames_are_decompressed_only_when_asked_and_kept_in_a_bounded_cache(tmp_path):
    frames = {pfn: _page(pfn) for pfn in range(0, 400, 2)}
    dump = KdumpCompressed(write_kdump(tmp_path / "d.kdump", frames, 512), cache_pages=16)
    assert dump.decompressed == 0  # opening reads headers and the bitmap only
    dump.read_frames(np.array([10, 10, 12], np.uint64))
    assert dump.decompressed == 2
    dump.read_frames(np.arange(0, 400, 2, dtype=np.uint64))
    assert len(dump._cache) == 16 and dump.decompressed == 2 + 198
    dump.read_frames(np.array([398], np.uint64))  # still cached: the most recently used
    assert dump.decompressed == 200


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.integers(0, 3000), st.integers(0, 1 << 30), min_size=1, max_size=40),
       st.sampled_from(sorted(COMPRESS)), st.booleans())
def test_any_set_of_frames_reads_back_exactly(tmp_path_factory, seeds, compression, flattened):
    frames = {pfn: _page(seed) for pfn, seed in seeds.items()}
    path = write_kdump(tmp_path_factory.mktemp("k") / "d.kdump", frames, 3001,
                       compression=compression, flattened=flattened)
    dump = open_image(path)
    pfns = np.arange(3001, dtype=np.uint64)
    assert np.flatnonzero(dump.frames_present(pfns)).tolist() == sorted(frames)
    assert [dump.read_frame(p).tobytes() for p in sorted(frames)] == [frames[p] for p in sorted(frames)]


# -- broken files: one line, never a traceback nor a wrong frame --------------------------

def _broken(tmp_path, data: bytes):
    path = tmp_path / "broken.kdump"
    path.write_bytes(data)
    return path


def _layout():
    data = bytearray(kdump_bytes(FRAMES, 4096))
    sub_blocks, bitmap_blocks = struct.unpack_from("<II", data, 432)
    desc_at = (1 + sub_blocks + bitmap_blocks) * 4096
    return data, desc_at


def test_a_bitmap_cut_short_is_refused(tmp_path):
    data, desc_at = _layout()
    with pytest.raises(InputError, match="dumped-page bitmap .* truncated"):
        open_image(_broken(tmp_path, bytes(data[:desc_at - 4096 + 100])))


def test_page_descriptors_past_the_end_are_refused(tmp_path):
    data, desc_at = _layout()
    with pytest.raises(InputError, match="page descriptors run to .* truncated"):
        open_image(_broken(tmp_path, bytes(data[:desc_at + 24 * 2])))


def test_a_descriptor_pointing_past_the_end_names_the_frame(tmp_path):
    data, desc_at = _layout()
    struct.pack_into("<Q", data, desc_at + 24 * 1, len(data) + 4096)  # pfn 3's data offset
    dump = open_image(_broken(tmp_path, bytes(data)))
    with pytest.raises(InputError, match="data of pfn 0x3 .* past the end"):
        dump.read_frames(np.array([3], np.uint64))


def test_a_corrupt_compressed_page_names_the_frame(tmp_path):
    data, desc_at = _layout()
    offset, size = struct.unpack_from("<QI", data, desc_at + 24 * 2)  # pfn 4
    data[offset:offset + 8] = b"\xff" * 8
    dump = open_image(_broken(tmp_path, bytes(data)))
    with pytest.raises(InputError, match="zlib page of pfn 0x4 does not decompress"):
        dump.read_frames(np.array([4], np.uint64))
    assert dump.read_frame(3).tobytes() == FRAMES[3]  # the others still read


@pytest.mark.parametrize("edit, words", [
    (lambda d: struct.pack_into("<I", d, 428, 1024), "block size 1024"),
    (lambda d: struct.pack_into("<I", d, 436, 0), "bitmaps of 0 bytes"),
    (lambda d: d.__setitem__(slice(0, 8), b"KDUMP  X"), "not a kdump-compressed dump"),
])
def test_impossible_headers_are_refused(tmp_path, edit, words):
    data, _ = _layout()
    edit(data)
    with pytest.raises(InputError, match=words):
        KdumpCompressed(_broken(tmp_path, bytes(data)))


def test_a_flattened_stream_without_its_end_marker_is_refused(tmp_path):
    data = flatten(kdump_bytes(FRAMES, 4096))[:-16]
    with pytest.raises(InputError, match="without its end marker"):
        open_image(_broken(tmp_path, data))


def test_a_page_of_unknown_compression_is_refused(tmp_path):
    data, desc_at = _layout()
    struct.pack_into("<I", data, desc_at + 24 * 1 + 12, 0x40)
    with pytest.raises(InputError, match="unknown compression flags 0x40"):
        open_image(_broken(tmp_path, bytes(data))).read_frames(np.array([3], np.uint64))


@pytest.mark.parametrize("command", ["audit", "dump", "meltdown"])
def test_the_cli_refuses_a_broken_dump_in_one_line(tmp_path, command):
    import subprocess
    import sys

    data, desc_at = _layout()
    offset, _ = struct.unpack_from("<QI", data, desc_at)  # pfn 0: the PGD below
    data[offset:offset + 4] = b"\xff" * 4
    path = _broken(tmp_path, bytes(data))
    done = subprocess.run([sys.executable, "-m", "ptilab.cli", command, str(path), "--cr3", "0"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("ptilab: error: ")
    assert "zlib page of pfn 0x0 does not decompress" in done.stderr
