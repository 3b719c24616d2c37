import pytest

from ptilab.errors import InputError, UsageError
from ptilab.memory.elfcore import ElfCore
from ptilab.memory.elfwrite import write_elf_core
from ptilab.memory.images import open_image
from ptilab.memory.raw import RawImage
from tests.memory.test_elfcore import frames


def test_open_image_tells_an_elf_core_from_a_raw_image(tmp_path):
    write_elf_core(tmp_path / "core", [(0x5000, frames(1))])
    (tmp_path / "raw").write_bytes(frames(1))
    core, raw = open_image(tmp_path / "core"), open_image(tmp_path / "raw", base=0x5000)
    assert isinstance(core, ElfCore) and isinstance(raw, RawImage)
    assert core.read_entry(0x5008) == raw.read_entry(0x5008) == 2
    assert open_image(tmp_path / "raw").end == 0x1000


def test_open_image_refuses_a_base_for_an_elf_core(tmp_path):
    write_elf_core(tmp_path / "core", [(0, frames(1))])
    with pytest.raises(UsageError):
        open_image(tmp_path / "core", base=0x1000)


def test_open_image_of_a_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="nope"):
        open_image(tmp_path / "nope")


def test_every_image_closes_its_file_when_its_with_block_ends(tmp_path):
    write_elf_core(tmp_path / "core", [(0x5000, frames(1))])
    (tmp_path / "raw").write_bytes(frames(1))
    for path in (tmp_path / "core", tmp_path / "raw"):
        with open_image(path) as image:
            mapped = image._mmap
            assert image.read_entry(image.end - 0x1000 + 8) == 2
        assert mapped is not None and mapped.closed
