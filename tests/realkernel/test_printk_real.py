"""`ptilab log` on the real boots: the guest's own dmesg and console lines, and Debian's
makedumpfile --dump-dmesg of the same dumps.

dmesg.txt is busybox dmesg run inside the guest before the dump (klogctl's
SYSLOG_ACTION_READ_ALL, the kernel's record_print_text(): the timestamp on
every line of a multi-line record); console.txt is the serial console. Both
were taken before the dump, so the log may hold more at its end.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ptilab.linux.printk import format_dmesg, image_vmcoreinfo, read_kernel_log, read_ring
from tests.realkernel.build import CONFIGS
from tests.realkernel.conftest import DUMP_CONFIGS, LIME_CONFIGS, REAL_CONFIGS, real_kernel

SRC = str(Path(__file__).resolve().parents[2] / "src")
MAKEDUMPFILE_READS = ["kdump.elf", "makedumpfile-zlib.dump", "makedumpfile-lzo.dump"]


def _log(path: Path):
    from ptilab.memory.images import open_image

    mem = open_image(path)
    return read_kernel_log(mem, image_vmcoreinfo(mem, str(path)))


def _timestamped(path: Path) -> list[str]:
    return [line for line in path.read_text(errors="replace").splitlines() if line.startswith("[")]


@pytest.mark.parametrize("config", REAL_CONFIGS)
def test_every_line_the_guest_printed_is_in_the_log_verbatim(config):
    k = real_kernel(config)
    records = _log(k.path / "core.elf")
    ours = format_dmesg(records, prefix_each_line=True).splitlines()
    dmesg = _timestamped(k.path / "dmesg.txt")
    assert len(dmesg) > 100
    # busybox dmesg read the ring from its start: its lines are ours, in order, and ours go on after them.
    assert ours[:len(dmesg)] == dmesg
    console = _timestamped(k.path / "console.txt")
    assert _in_order(console, ours)
    if CONFIGS[config].console_log:  # booted without quiet: every message up to init went to the console
        assert len(console) > 100 and console[0] == ours[0]  # the banner: pr_notice, which quiet hides
    else:  # quiet loglevel=4: warnings and worse only
        assert len(console) < len(dmesg) // 2


def _in_order(lines: list[str], log: list[str]) -> bool:
    """Whether lines are some of log's, in log's order."""
    rest = iter(log)
    return all(any(line == seen for seen in rest) for line in lines)


@pytest.mark.parametrize("config", REAL_CONFIGS)
def test_records_carry_printks_own_fields(config):
    records = _log(real_kernel(config).path / "core.elf")
    first = records[0]
    # start_kernel()'s banner: pr_notice() (level 5) from the boot task, pid 0, at time 0, seq 0.
    assert (first.seq, first.ts_nsec, first.level, first.caller_id) == (0, 0, 5, "T0")
    assert first.text.startswith(f"Linux version {real_kernel(config).meta['kernel_release']} ")
    assert [r.seq for r in records] == list(range(len(records)))  # nothing lost since boot: no gap
    assert {r.facility for r in records} == {0}  # LOG_KERN: nothing wrote to /dev/kmsg
    assert all(0 <= r.level <= 7 for r in records)
    assert any(r.text.startswith("Command line: ") for r in records)


@pytest.mark.skipif(not shutil.which("makedumpfile"), reason="makedumpfile is not installed")
@pytest.mark.parametrize("name", MAKEDUMPFILE_READS)
@pytest.mark.parametrize("config", DUMP_CONFIGS)
def test_the_log_is_makedumpfiles_byte_for_byte(config, name, tmp_path):
    """makedumpfile reads kdump's ELF and its own -c/-l dumps (not QEMU's dump-guest-memory ELF
    nor QEMU's kdump-compressed files: it refuses both), and writes the log with no header."""
    path = real_kernel(config).path / name
    out = tmp_path / "dmesg"
    done = subprocess.run(["makedumpfile", "--dump-dmesg", str(path), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    theirs = out.read_bytes()
    ours = subprocess.run([sys.executable, "-m", "ptilab.cli", "log", str(path)], capture_output=True,
                          env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
    assert ours.returncode == 0 and ours.stderr == b""
    assert ours.stdout == theirs
    assert b"\n    " in theirs or config != "epyc-auto-kaslr"  # its multi-line records are printed alike


@pytest.mark.parametrize("config", DUMP_CONFIGS)
def test_every_dump_of_a_boot_gives_the_same_log(config):
    k = real_kernel(config)
    want = format_dmesg(_log(k.path / "core.elf"))
    for name in [*MAKEDUMPFILE_READS, "kdump-zlib.dump"]:
        assert format_dmesg(_log(k.path / name)) == want, name


@pytest.mark.parametrize("config", DUMP_CONFIGS)
def test_the_log_reads_only_the_frames_of_the_ring(config):
    """A makedumpfile -d 31 dump keeps the ring (kernel data) and reading it touches only its frames."""
    from ptilab.memory.images import open_image

    mem = open_image(real_kernel(config).path / "makedumpfile-lzo.dump")
    seen = set()
    original = mem.read_frames
    mem.read_frames = lambda pfns: (seen.update(int(p) for p in pfns), original(pfns))[1]
    log = read_ring(mem, image_vmcoreinfo(mem, "dump"))
    # Besides the ring, only the page tables on the way to its four pieces (this reader reads
    # entries through read_frames): a handful of PGD, PUD, PMD and PTE pages.
    assert set(log.frames) <= seen and len(seen - set(log.frames)) <= 4 * 4 and len(seen) < 200


@pytest.mark.parametrize("config", LIME_CONFIGS)
def test_a_lime_dump_gives_the_log_through_the_vmcoreinfo_in_its_ram(config):
    """LiME writes RAM alone: no ELF note. The log comes from the VMCOREINFO copy the kernel keeps
    in its own memory (found and confirmed by memory.vmcoreinfo), and holds what the guest had printed."""
    from ptilab.memory.images import open_image

    path = real_kernel(config).path / "lime.dump"
    assert open_image(path).vmcoreinfo.found_at is not None
    done = subprocess.run([sys.executable, "-m", "ptilab.cli", "log", str(path)], capture_output=True, text=True,
                          env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and done.stderr == ""
    dmesg = _timestamped(real_kernel(config).path / "dmesg.txt")
    ours = format_dmesg(_log(path), prefix_each_line=True).splitlines()
    # LiME dumped RAM at boot, before busybox dmesg ran: its log is the start of the guest's dmesg.
    assert len(ours) > 100 and dmesg[:len(ours)] == ours


def test_log_live_reads_the_ring_through_kcore(tmp_path):
    """A /proc/kcore over pti-4level's tables and ring frames gives the log the core does."""
    from ptilab.memory.images import open_image
    from tests.memory.fake_kcore import table_frames, write_kcore

    k = real_kernel("pti-4level")
    mem = open_image(k.path / "core.elf")
    info = image_vmcoreinfo(mem, "core")
    ring = read_ring(mem, info)
    frames = table_frames(mem, info.kernel_pgd, info.levels, tuple(pfn << 12 for pfn in ring.frames))
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/version").write_text("Linux version 6.1.0\n")
    write_kcore(tmp_path / "proc/kcore", [(0, 0xA0000), (0x100000, mem.end - 0x100000)], frames,
                mem.vmcoreinfo_text)
    done = subprocess.run([sys.executable, "-m", "ptilab.cli", "log", "--live", str(tmp_path)],
                          capture_output=True, text=True, env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == format_dmesg(ring.records)
