"""The kernel-half match, frame by frame: exact but for what Linux lets differ."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ptilab.paging import entry as e
from ptilab.scan import roots


def _half(seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    half = np.zeros(256, np.uint64)
    slots = rng.choice(256, 40, replace=False)
    half[slots] = (rng.integers(1, 1 << 30, 40, dtype=np.uint64) << np.uint64(12)) | np.uint64(e.KERNPG_TABLE)
    half[511 - 256] = np.uint64(0x2A15000 | e.KERNPG_TABLE)
    return half


def _frames(half: np.ndarray, n: int) -> np.ndarray:
    frames = np.zeros((n, 512), np.uint64)
    frames[:, 256:] = half
    return frames


def test_every_frame_with_the_kernel_half_matches_and_no_other():
    half = _half()
    frames = np.random.default_rng(2).integers(0, 1 << 63, (64, 512), dtype=np.uint64)
    frames[[3, 17, 40], 256:] = half
    frames[5, 256:] = half
    frames[5, 300] ^= np.uint64(1 << 12)  # one slot points elsewhere
    assert roots.match_kernel_half(frames, half).tolist() == [3, 17, 40]


def test_the_ldt_slot_and_the_accessed_bit_may_differ():
    half = _half()
    frames = _frames(half, 3)
    frames[0, roots.LDT_SLOT] = np.uint64(0x1234000 | e.KERNPG_TABLE)  # map_ldt_struct() in this mm
    frames[1, 256:] &= ~np.uint64(e.A)
    frames[2, 511] |= np.uint64(e.NX)  # NX on a kernel-half entry: not something Linux writes
    assert roots.match_kernel_half(frames, half).tolist() == [0, 1]


def test_the_probe_column_is_the_kernel_texts_and_never_the_ldt_slot():
    half = _half()
    assert roots.probe_slot(half) == 511
    only_ldt = np.zeros(256, np.uint64)
    only_ldt[roots.LDT_SLOT - 256] = np.uint64(0x1000 | e.KERNPG_TABLE)
    only_ldt[10] = np.uint64(0x2000 | e.KERNPG_TABLE)
    assert roots.probe_slot(only_ldt) == 266


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.integers(0, 63)), max_size=6), st.integers(0, 5))
def test_match_equals_comparing_the_whole_half(flips, seed):
    """The probe is only a shortcut: the answer is the whole-half comparison's."""
    half = _half(seed)
    frames = _frames(half, 8)
    for i, (slot, bit) in enumerate(flips):
        frames[i % 8, 256 + slot] ^= np.uint64(1 << bit)
    keep = ~np.uint64(e.A)
    differ = (frames[:, 256:] ^ half) & keep
    differ[:, roots.LDT_SLOT - 256] = 0
    expected = np.flatnonzero(~differ.any(axis=1))
    assert roots.match_kernel_half(frames, half).tolist() == expected.tolist()


def test_a_chunk_is_read_from_the_file_at_its_offset(tmp_path):
    half = _half()
    frames = np.zeros((40, 512), np.uint64)
    frames[[7, 30], 256:] = half
    path = tmp_path / "mem.raw"
    with open(path, "wb") as f:
        f.write(b"\0" * 100)  # an unaligned offset, as QEMU's cores have
        f.write(frames.tobytes())
    chunk = roots.Chunk(str(path), 0x500, 40, 100)
    assert roots.scan_chunk(chunk, half).tolist() == [0x507, 0x51E]


def test_holes_of_a_sparse_file_are_skipped_without_losing_a_root(tmp_path):
    half = _half()
    path = tmp_path / "sparse.raw"
    frame = np.zeros(512, np.uint64)
    frame[256:] = half
    with open(path, "wb") as f:
        f.truncate(1 << 30)
        f.seek(123_456 * 4096)
        f.write(frame.tobytes())
    from ptilab.memory.images import open_image
    parts = roots.chunks(open_image(path), str(path))
    assert sum(c.frames for c in parts) == 1 << 18
    found = np.concatenate([roots.scan_chunk(c, half) for c in parts])
    assert found.tolist() == [123_456]


def _census(tmp_path, frames: np.ndarray):
    from ptilab.memory.raw import RawImage

    path = tmp_path / "mem.raw"
    path.write_bytes(frames.tobytes())
    return roots.census_chunk(roots.Chunk(str(path), 0, len(frames), 0)), RawImage(str(path))


def _in_memory(slots, frames: int) -> np.ndarray:
    """A kernel half whose slots point at distinct tables inside frames frames of memory."""
    half = np.zeros(256, np.uint64)
    for i, slot in enumerate(slots):
        half[slot - 256] = np.uint64(((frames - 1 - i) << e.PAGE_SHIFT) | e.KERNPG_TABLE)
    return half


def test_the_census_counts_every_frame_with_a_plausible_half(tmp_path):
    half = _in_memory([273, 300, 508, 511], 64)
    frames = _frames(half, 6)
    frames[4, 256:] = _in_memory([300, 508, 511], 64)
    frames[2, roots.LDT_SLOT] = np.uint64(0x5000 | e.KERNPG_TABLE)  # one mm with an LDT counts the same
    frames[5, 511] |= np.uint64(e.PS)  # a 512 GiB page: no Linux kernel half
    counts, mem = _census(tmp_path, np.concatenate([frames, np.zeros((58, 512), np.uint64)]))
    assert sum(counts.values()) == 5
    best, n = roots.reference_half(counts, mem)
    assert n == 4
    assert (best == (half & ~np.uint64(e.A))).all()


def test_the_reference_is_the_repeated_half_mapping_most_slots_with_its_tables_in_memory(tmp_path):
    """A PTI user PGD's half (a subset of the kernel's slots) in more frames than
    the kernel's, and a fill pattern (one value in every slot) in more still,
    lose to the kernel half: LiME's dump of a real boot held both."""
    kernel = _in_memory([273, 300, 416, 468, 508, 511], 64)
    user = _in_memory([273, 508, 511], 64)
    frames = np.zeros((64, 512), np.uint64)
    frames[0:4, 256:] = kernel
    frames[4:10, 256:] = user
    frames[10:18, 256:] = np.uint64((0x5AE350005A << e.PAGE_SHIFT) | 0x15)  # past the end of memory
    frames[18:28, 256:] = np.uint64((40 << e.PAGE_SHIFT) | e.KERNPG_TABLE)  # inside, but one table
    counts, mem = _census(tmp_path, frames)
    best, n = roots.reference_half(counts, mem)
    assert n == 4 and (best == (kernel & ~np.uint64(e.A))).all()
    frames[0:4] = 0
    counts, mem = _census(tmp_path, frames)
    assert (roots.reference_half(counts, mem)[0] == (user & ~np.uint64(e.A))).all()
    frames[4:10] = 0
    counts, mem = _census(tmp_path, frames)
    assert roots.reference_half(counts, mem) is None
