"""The same real kernel's memory in every format users hold: each audits, dumps and reads like core.elf.

Each config with dumps (6.1's pti-kaslr, 7.2's 7.2-pti-kaslr) holds, of one boot:
core.elf (QEMU's ELF), kdump.elf (kdump's ELF vmcore shape: no CR3),
kdump-zlib.dump (QEMU's dump-guest-memory -z, a flattened diskdump),
makedumpfile-{zlib,lzo}.dump (Debian's makedumpfile -c/-l -d 31) and, where
Debian's LiME builds for the kernel (6.1), lime.dump (LiME run in the guest at boot).
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from ptilab.memory.images import open_image
from ptilab.memory.kdump import KdumpCompressed
from ptilab.memory.lime import LimeImage
from tests.memory.dumpfiles import lime_bytes
from tests.realkernel.conftest import DUMP_CONFIGS, LIME_CONFIGS, real_kernel

KDUMPS = ["kdump-zlib.dump", "makedumpfile-zlib.dump", "makedumpfile-lzo.dump"]


def _with_init_mm(config: str):
    k = real_kernel(config)
    k.kernel_pgd = k.mem.vmcoreinfo.kernel_pgd
    return k


@pytest.fixture(scope="module", params=DUMP_CONFIGS)
def kaslr(request):
    return _with_init_mm(request.param)


@pytest.fixture(scope="module", params=LIME_CONFIGS)
def with_lime(request):
    return _with_init_mm(request.param)


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ptilab.cli", *map(str, args)], capture_output=True, text=True)


def _audit(*args) -> dict:
    done = _cli("audit", "--json", *args)
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("name", KDUMPS)
def test_every_dumped_frame_of_a_kdump_file_equals_the_elf_cores(kaslr, name):
    dump = open_image(kaslr.path / name)
    assert isinstance(dump, KdumpCompressed)
    pfns = np.arange(dump.max_pfn, dtype=np.uint64)
    dumped = pfns[dump.frames_present(pfns)]
    assert len(dumped) > 16000
    assert kaslr.mem.frames_present(dumped).all()
    for chunk in np.array_split(dumped, 8):
        assert np.array_equal(dump.read_frames(chunk), kaslr.mem.read_frames(chunk))
    info = dump.vmcoreinfo
    assert info.osrelease == kaslr.meta["kernel_release"] and info.kernel_pgd == kaslr.kernel_pgd


def test_qemu_writes_a_flattened_dump_with_its_cpu_notes(kaslr):
    dump = open_image(kaslr.path / "kdump-zlib.dump")
    assert dump.flattened and dump.dump_level == 1
    assert [c.cr3 for c in dump.cpus] == [c["cr3"] for c in kaslr.meta["cpus"]]


def test_makedumpfile_excludes_pages_at_dump_level_31_but_no_page_table(kaslr):
    dump = open_image(kaslr.path / "makedumpfile-lzo.dump")
    assert not dump.flattened and dump.dump_level == 31 and dump.cpus == ()
    assert dump.dumped_frames < 0.5 * (dump.max_pfn)
    core = _audit(kaslr.path / "core.elf", "--cr3", f"{kaslr.kernel_pgd:x}")
    tables = core["user_view"]["table_pages"]
    assert sum(tables.values()) > 4  # the walk below read real tables, all of them dumped
    assert _audit(kaslr.path / "makedumpfile-lzo.dump")["user_view"]["table_pages"] == tables


def _audits_like_the_core(k, name: str) -> None:
    # QEMU's kdump file carries QEMU's CPU notes: the user-mode CPU's CR3, as
    # core.elf; kdump.elf and makedumpfile's have VMCOREINFO only: init_mm's
    # pair; LiME has neither, but the kernel's VMCOREINFO is in its RAM: init_mm's too.
    init_mm = ["--cr3", f"{k.kernel_pgd:x}"]
    got = _audit(k.path / name)
    want = _audit(k.path / "core.elf", *([] if name == "kdump-zlib.dump" else init_mm))
    assert got["pti_pair"] == want["pti_pair"] and got["pti_pair"]["is_pti"]
    assert got["findings"] == want["findings"]
    assert got["user_view"] == want["user_view"]


@pytest.mark.parametrize("name", KDUMPS + ["kdump.elf"])
def test_audit_of_every_format_equals_the_elf_cores(kaslr, name):
    _audits_like_the_core(kaslr, name)


def test_audit_of_the_lime_dump_equals_the_elf_cores(with_lime):
    _audits_like_the_core(with_lime, "lime.dump")


def test_dump_and_meltdown_read_a_kdump_file_as_they_read_the_core(kaslr):
    cpu = f"{kaslr.cpu()['cr3']:x}"
    for command in (["dump", "--format", "qemu"], ["meltdown", "--system-map", kaslr.path / "kallsyms.txt"]):
        from_kdump = _cli(*command[:1], kaslr.path / "kdump-zlib.dump", *command[1:])
        from_core = _cli(*command[:1], kaslr.path / "core.elf", "--cr3", cpu, *command[1:])
        assert from_kdump.returncode == from_core.returncode == 0, from_kdump.stderr
        assert from_kdump.stdout == from_core.stdout.replace("core.elf", "kdump-zlib.dump")
        assert len(from_kdump.stdout) > 1000


def test_real_lime_module_dumps_the_system_ram_ranges(with_lime):
    dump = open_image(with_lime.path / "lime.dump")
    assert isinstance(dump, LimeImage)
    # /proc/iomem's "System RAM" of a 256 MiB q35 guest: below 640 KiB, then from 1 MiB.
    assert [start for start, _ in dump.segments] == [0x1000, 0x100000]
    assert dump.segments[-1][1] <= 256 << 20
    # lime.ko was built for the very kernel the guest ran (its vermagic names that release)
    assert with_lime.meta["lime"].split()[0] == with_lime.meta["kernel_release"]


def test_a_lime_file_of_the_cores_ranges_audits_like_the_core(kaslr, tmp_path):
    # The format on the core's own memory, frame for frame: the same moment, unlike lime.dump.
    path = tmp_path / "core.lime"
    with path.open("wb") as f:
        for start, end in kaslr.mem.segments:
            frames = np.arange(start >> 12, end >> 12, dtype=np.uint64)
            f.write(lime_bytes([(start, kaslr.mem.read_frames(frames).tobytes())]))
    cr3 = f"{kaslr.cpu()['cr3']:x}"
    got, want = _audit(path, "--cr3", cr3), _audit(kaslr.path / "core.elf", "--cr3", cr3)
    assert got["findings"] == want["findings"] and got["user_view"] == want["user_view"]
