"""Text readers: a line at a time, binary refused after its first kilobyte, no line unbounded."""

import pytest

from ptilab.errors import InputError
from ptilab.formats.kallsyms import USED, read_symbols
from ptilab.formats.ptdump import parse_ptdump, read_ptdump
from ptilab.formats.qemu import read_info_mem, read_info_tlb
from ptilab.formats.textfile import MAX_LINE, read_lines

LINE = "0xfffffe0000000000-0xfffffe0000001000           4K     ro                 GLB NX pte\n"


@pytest.mark.parametrize("reader", [read_ptdump, read_symbols, read_info_mem, read_info_tlb])
@pytest.mark.parametrize("head, words", [
    (b"\x7fELF\x02\x01\x01\x00", "an ELF file: give it as IMAGE"),
    (b"hello\x00world", "a NUL byte at offset 5"),
    (b"ok\n\x1b[2J\xff\xfe", "not UTF-8 at offset"),
    (b"ok\n\x1b[2J clear the screen", "control byte 0x1b at offset 3"),
])
def test_binary_data_is_refused_in_one_line_naming_what_it_looks_like(tmp_path, reader, head, words):
    path = tmp_path / "in.txt"
    path.write_bytes(head + b"padding\n" * 200)
    with pytest.raises(InputError) as refused:
        reader(path)
    message = str(refused.value)
    assert "binary data, not" in message and words in message and "\n" not in message
    assert "\x1b" not in message  # nothing of the file is echoed raw


@pytest.mark.parametrize("reader", [read_ptdump, read_symbols, read_info_mem, read_info_tlb])
def test_a_64_gib_sparse_file_is_refused_at_once(tmp_path, reader):
    path = tmp_path / "sparse.txt"
    with open(path, "wb") as f:
        f.truncate(64 << 30)
    with pytest.raises(InputError, match="binary data.*a NUL byte at offset 0"):
        reader(path)


def test_a_line_without_end_is_refused_after_max_line_bytes(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("---[ User Space ]---\n" + "a" * (10 * MAX_LINE))
    lines = read_lines(path, "ptdump text")
    assert next(lines) == (1, "---[ User Space ]---")
    with pytest.raises(InputError, match=r"long.txt:2: a line longer than 4096 bytes: not ptdump text"):
        next(lines)


def test_a_file_read_a_line_at_a_time_parses_as_the_text_does(tmp_path):
    text = "---[ CPU entry Area ]---\n" + LINE * 3
    path = tmp_path / "current_user"
    path.write_text(text)
    assert read_ptdump(path).ranges.tobytes() == parse_ptdump(text).ranges.tobytes()


def test_only_the_symbols_used_are_kept_when_asked(tmp_path):
    path = tmp_path / "System.map"
    path.write_text("ffffffff81000000 T _text\nffffffff81000010 T other\n"
                    "ffffffff81e00000 T __entry_text_start\n")
    assert read_symbols(path, USED) == {"_text": 0xFFFF_FFFF_8100_0000, "__entry_text_start": 0xFFFF_FFFF_81E0_0000}
    assert "other" in read_symbols(path)


@pytest.mark.parametrize("end, width", [(0x1000, 1), (0x1000, 5), (0x1000, 9), (0x7FFF_FFFF_F000, 11)])
def test_a_size_column_of_any_width_reads_when_its_value_is_right(end, width):
    """The kernel prints "%9lu%c": at least 9 wide, wider for larger values
    (0x7ffffffff000 bytes is 34359738364K, 11 digits); a narrower column (a
    hand-trimmed file) is read when the value matches."""
    from ptilab.formats.ptdump import format_size
    value = format_size(end).strip()
    line = f"0x0000000000000000-{end:#018x}   {value:>{width}} {' ' * 30}pte"
    assert int(parse_ptdump(line).ranges["size"][0]) == end


def test_a_wrong_size_is_still_refused():
    line = f"0xfffffe0000000000-0xfffffe0000001000   {'8K':>9} {' ' * 30}pte"
    with pytest.raises(InputError, match="size 8K does not match"):
        parse_ptdump(line)
