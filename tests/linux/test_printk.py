"""The printk ring reader on rings written as Linux's writer fills them (tests/linux/printk_ring.py),
and on rings made hostile: one InputError line, never a crash or a hang."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptilab.errors import InputError
from ptilab.linux.printk import (LogRecord, caller_name, format_dmesg, format_record, image_vmcoreinfo,
                                 read_kernel_log, read_ring)
from ptilab.memory.simulated import SimulatedRAM
from ptilab.memory.vmcoreinfo import parse_vmcoreinfo
from tests.linux.printk_ring import LAYOUT, Message, build_ring, vmcoreinfo_text

ID_MASK = (1 << 62) - 1


def _read(ring, **changes):
    text = vmcoreinfo_text(ring.prb - 0x40, **changes) if changes else ring.vmcoreinfo
    return read_ring(ring.ram, parse_vmcoreinfo(text))


def _messages(n: int, width: int = 1) -> list[Message]:
    return [Message(f"message {i}".encode() + b" words" * (i % 4 * width), ts_nsec=i * 1_234_567_891,
                    level=i % 8, facility=i % 2, caller_id=(0x80000000 | i % 4) if i % 3 else 100 + i)
            for i in range(n)]


def _same(records: list[LogRecord], survivors) -> None:
    assert [(r.seq, r.raw, r.ts_nsec, r.level, r.facility, r.caller_id) for r in records] == \
        [(seq, m.text, m.ts_nsec, m.level, m.facility, caller_name(m.caller_id)) for seq, m in survivors]


# -- a ring reads back as written ----------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.lists(st.builds(Message, st.binary(min_size=0, max_size=90), st.integers(0, 1 << 50),
                          st.integers(0, 7), st.integers(0, 23), st.integers(0, (1 << 32) - 1)),
                min_size=1, max_size=80),
       st.integers(2, 6), st.integers(8, 11), st.sampled_from([4, 5]), st.integers(0, 3))
def test_a_written_ring_reads_back_as_written(messages, count_bits, size_bits, levels, seed):
    """Whatever was printed, the reader finds exactly the records still finalized from tail to
    head, in order and byte for byte, wrapped blocks included."""
    ring = build_ring(messages, count_bits, size_bits, levels, seed)
    if not ring.survivors:  # every block too large for the ring (data_check_size() refused them)
        with pytest.raises(InputError, match="no committed record"):
            _read(ring)
        return
    log = _read(ring)
    _same(list(log.records), ring.survivors)
    # The newest message that fits is always there: nothing pushes out the head.
    assert log.records[-1].seq == max(seq for seq, _ in ring.survivors)
    assert log.skipped == ((ring.head_id - ring.tail_id) & ID_MASK) + 1 - len(log.records)


def test_blocks_that_wrap_are_read_from_the_ring_start():
    ring = build_ring(_messages(60, 3), count_bits=5, size_bits=9)
    assert ring.wraps >= 3  # the case under test happened
    _same(read_kernel_log(ring.ram, parse_vmcoreinfo(ring.vmcoreinfo)), ring.survivors)


def test_the_reader_reads_only_the_frames_the_ring_spans():
    ring = build_ring(_messages(30), count_bits=6, size_bits=12, seed=2)
    frames = set()
    original = ring.ram.read_frames

    def counting(pfns):
        frames.update(int(p) for p in pfns)
        return original(pfns)

    ring.ram.read_frames = counting
    log = _read(ring)
    assert set(log.frames) == ring.ring_frames
    assert frames == ring.ring_frames  # read_entry() (the walk) does not go through read_frames


def test_five_level_tables_are_walked_with_five_levels():
    ring = build_ring(_messages(12), levels=5)
    _same(list(_read(ring).records), ring.survivors)
    with pytest.raises(InputError, match="not mapped"):
        _read(ring, pgtable_l5_enabled=0)


# -- dmesg's text ------------------------------------------------------------------------

def _record(text: bytes, ts: int = 12_345_678_901) -> LogRecord:
    return LogRecord(7, ts, 6, 0, "T1", text.decode("utf-8", "backslashreplace"), text)


def test_a_record_prints_as_makedumpfile_prints_it():
    assert format_record(_record(b"Command line: quiet")) == "[   12.345678] Command line: quiet"
    assert format_record(_record(b"x", ts=123_456_789_012_345)) == "[123456.789012] x"
    # makedumpfile's dump_record(): lines after a newline indented under the first.
    assert format_record(_record(b"first\nsecond")) == "[   12.345678] first\n               second"
    assert format_record(_record(b"first\nsecond"), prefix_each_line=True) == \
        "[   12.345678] first\n[   12.345678] second"
    assert format_record(_record(b"a\x01b\x7f\tc\xc3\xa9")) == "[   12.345678] a\\x01b\\x7f\tc\\xc3\\xa9"
    assert format_dmesg([_record(b"a"), _record(b"b")]) == "[   12.345678] a\n[   12.345678] b\n"


def test_callers_are_named_as_printk_names_them():
    assert caller_name(123) == "T123" and caller_name(0x80000001) == "C1" and caller_name(0) == "T0"


def test_a_record_as_json_says_seq_time_level_caller_and_text():
    assert _record(b"hi \xff").as_dict() == {"seq": 7, "time": "12.345678", "ts_nsec": 12_345_678_901, "level": 6,
                                            "facility": 0, "caller": "T1", "text": "hi \\xff"}


# -- what the image or VMCOREINFO lacks ------------------------------------------------------

def test_an_image_without_vmcoreinfo_is_refused_in_one_line():
    with pytest.raises(InputError, match="mem.lime carries no VMCOREINFO"):
        image_vmcoreinfo(SimulatedRAM(1 << 20), "mem.lime")


def test_a_kernel_before_5_10_is_refused_naming_log_buf():
    ring = build_ring(_messages(3))
    text = ring.vmcoreinfo.replace("SYMBOL(prb)", "SYMBOL(log_buf)")
    with pytest.raises(InputError, match=r"log_buf \(Linux before 5.10\).*SYMBOL\(prb\)"):
        read_ring(ring.ram, parse_vmcoreinfo(text))


def test_missing_ring_offsets_are_named():
    ring = build_ring(_messages(3))
    with pytest.raises(InputError, match=r"lacks OFFSET\(printk_info.text_len\)"):
        _read(ring, **{"printk_info__text_len": None})


def test_an_offset_past_its_structure_is_refused():
    ring = build_ring(_messages(3))
    with pytest.raises(InputError, match=r"printk_info.caller_id at 200, past SIZE\(printk_info\)=88"):
        _read(ring, **{"printk_info__caller_id": 200})


# -- hostile rings -------------------------------------------------------------------------

RB_COUNT_BITS, RB_HEAD, RB_TAIL, RB_DESCS, RB_DATA, RB_SIZE_BITS = 0, 24, 32, 8, 56, 48


@pytest.mark.parametrize("bits", [29, 60, 0xFFFFFFFF])
def test_a_count_bits_printk_never_allocates_is_refused(bits):
    ring = build_ring(_messages(5))
    ring.poke(ring.prb + RB_COUNT_BITS, "<I", bits)
    with pytest.raises(InputError, match=f"count_bits {bits}"):
        _read(ring)


@pytest.mark.parametrize("bits", [0, 2, 32, 64])
def test_a_data_ring_size_printk_never_allocates_is_refused(bits):
    ring = build_ring(_messages(5))
    ring.poke(ring.prb + RB_SIZE_BITS, "<I", bits)
    with pytest.raises(InputError, match=f"2\\^{bits} bytes"):
        _read(ring)


def test_a_count_bits_larger_than_the_image_is_refused():
    ring = build_ring(_messages(5))
    ring.poke(ring.prb + RB_COUNT_BITS, "<I", 28)  # 2^28 descriptors of 24 bytes: 6 GiB in 64 MiB of RAM
    with pytest.raises(InputError, match="more than the image's"):
        _read(ring)


@pytest.mark.parametrize("head, tail", [(5, 6), (1 << 61, 0), (ID_MASK, 0), (100, 3)])
def test_a_tail_and_head_further_apart_than_the_ring_are_refused(head, tail):
    """The loop makedumpfile would run from tail to head (2^62 ids at worst) is bounded by the ring."""
    ring = build_ring(_messages(5))
    ring.poke(ring.prb + RB_HEAD, "<Q", head)
    ring.poke(ring.prb + RB_TAIL, "<Q", tail)
    with pytest.raises(InputError, match="descriptors apart, more than the ring's 16"):
        _read(ring)


def test_ids_out_of_range_leave_no_record_and_are_refused():
    ring = build_ring(_messages(20))
    for k in range(16):
        ring.poke(ring.descs + 24 * k, "<Q", (2 << 62) | (0x1234 + k))  # finalized, but another id
    with pytest.raises(InputError, match="holds no committed record in its 16 descriptors"):
        _read(ring)


@pytest.mark.parametrize("state", [0, 3])
def test_descriptors_neither_committed_nor_finalized_are_skipped(state):
    ring = build_ring(_messages(8))
    victim = ring.head_id - 2
    ring.poke(ring.desc(victim), "<Q", (state << 62) | (victim & ID_MASK))
    log = _read(ring)
    want = [(s, m) for s, m in ring.survivors if s != 5]  # seq 5 was id head - 2
    _same(list(log.records), want)


def test_a_text_len_past_its_block_is_cut_to_the_block():
    """makedumpfile's "handle truncated messages": text_len is clipped to what the block holds."""
    ring = build_ring(_messages(6))
    ring.poke(ring.info(ring.head_id) + LAYOUT["OFFSET(printk_info.text_len)"], "<H", 0xFFFF)
    log = _read(ring)
    last = ring.survivors[-1][1].text
    assert log.records[-1].raw.startswith(last) and len(log.records[-1].raw) < len(last) + 8


@pytest.mark.parametrize("begin, next_", [
    (0x10, 0x18 + 2 * (1 << 9)),  # a block longer than the ring: next two wraps ahead
    (0x10, 0x8),  # next before begin in the same wrap
    (0x11, 0x40),  # not aligned to the id
    (0x10, 0x10),  # empty
    (0x10, 0x14 + (1 << 9)),  # wrapping, but next not aligned
    ((1 << 64) - 8, 0x18),  # begin at the end of the lpos space, next after it wrapped
    (1, 1), (3, 3),  # FAILED_LPOS, EMPTY_LINE_LPOS: data-less
])
def test_a_block_the_kernel_could_not_have_written_is_skipped(begin, next_):
    ring = build_ring(_messages(6))
    ring.poke(ring.desc(ring.head_id) + 8, "<QQ", begin, next_)
    log = _read(ring)
    records = list(log.records)
    if begin == (1 << 64) - 8:
        # One wrap apart: the block lies at the ring's start (get_data()), and its text is the
        # first text_len of the 0x18 - 8 bytes there, whatever was stored there.
        seq, m = ring.survivors[-1]
        assert records[-1].seq == seq and len(records[-1].raw) == min(0x10, len(m.text))
        return
    _same(records, ring.survivors[:-1])


def test_ring_arrays_outside_the_tables_are_refused():
    ring = build_ring(_messages(6))
    ring.poke(ring.prb + RB_DATA, "<Q", 0xFFFF_8880_0000_0000)
    with pytest.raises(InputError, match="text data at 0xffff888000000000 is not mapped"):
        _read(ring)
    ring.poke(ring.prb + RB_DESCS, "<Q", 0x0000_8000_0000_0000)
    with pytest.raises(InputError, match="descs at 0x800000000000.*not a kernel address"):
        _read(ring)


def test_a_prb_pointer_into_unmapped_memory_is_refused():
    ring = build_ring(_messages(6))
    ring.poke(ring.prb - 0x40, "<Q", 0xFFFF_C900_0000_0000)
    with pytest.raises(InputError, match="header at 0xffffc90000000000 is not mapped"):
        _read(ring)


# -- the command, on an ELF core of the synthetic ring -----------------------------------

def _core(tmp_path, ring, vmcoreinfo: str | None = None):
    from ptilab.memory.elfwrite import write_memory_core

    path = tmp_path / "ring.elf"
    pfns = [int(p) for p in ring.ram._frames]
    write_memory_core(path, ring.ram, pfns, [(b"VMCOREINFO", 0, (vmcoreinfo or ring.vmcoreinfo).encode())])
    return path


def _ptilab(*args):
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[2] / "src")
    return subprocess.run([sys.executable, "-m", "ptilab.cli", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=src))


def test_ptilab_log_prints_the_ring_of_an_elf_core(tmp_path):
    import json

    ring = build_ring([Message(b"hello\nworld", ts_nsec=1_500_000_000)] + _messages(10), count_bits=5)
    path = _core(tmp_path, ring)
    done = _ptilab("log", path)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith("[    1.500000] hello\n               world\n[    0.000000] message 0\n")
    records = json.loads(_ptilab("log", "--json", path).stdout)["records"]
    assert [r["seq"] for r in records] == [seq for seq, _ in ring.survivors]
    assert records[0]["text"] == "hello\nworld" and records[0]["time"] == "1.500000"


def test_ptilab_log_refuses_a_hostile_ring_in_one_line(tmp_path):
    ring = build_ring(_messages(10))
    ring.poke(ring.prb + RB_COUNT_BITS, "<I", 60)
    done = _ptilab("log", _core(tmp_path, ring))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"ptilab: error: the printk ring at {ring.prb:#x} has count_bits 60: printk never " \
                          f"allocates more than 2^28 descriptors\n"


def test_ptilab_log_needs_an_image_or_live():
    done = _ptilab("log")
    assert done.returncode == 2 and done.stderr == "ptilab: error: give an IMAGE to read the log of, or --live\n"
