"""A real LA57 boot walked from a bare --cr3: the mode comes from the dump, never a silent 4-level default."""

import subprocess
import sys

import pytest

from tests.realkernel.conftest import raw_image, real_kernel


def ptilab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ptilab.cli", *args], capture_output=True, text=True, timeout=300)


def test_a_bare_cr3_of_a_five_level_core_takes_la57_from_the_cpu_notes():
    k = real_kernel("pti-5level")
    core, cr3 = str(k.path / "core.elf"), f"{k.cpu()['cr3']:x}"
    from_notes = ptilab("dump", core)
    bare = ptilab("dump", core, "--cr3", cr3)
    assert bare.returncode == 0 and bare.stdout == from_notes.stdout
    assert " p4d\n" in bare.stdout
    audited = ptilab("audit", core, "--cr3", cr3)
    assert audited.returncode == 0, audited.stdout
    assert "5-level" in audited.stdout and "KERNEL-USER-BIT" not in audited.stdout


@pytest.mark.parametrize("option, says", [("--no-la57", "5-level"), ("--la57", None)])
def test_an_option_the_notes_contradict_is_one_line_and_exit_2(option, says):
    k = real_kernel("pti-5level" if says else "pti-4level")
    done = ptilab("dump", str(k.path / "core.elf"), "--cr3", f"{k.cpu()['cr3']:x}", option)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"ptilab: error: {option}: the core's CPU ") and done.stderr.count("\n") == 1
    assert f"say {says or '4-level'} paging" in done.stderr


def test_a_raw_image_of_a_five_level_boot_is_walked_at_the_depth_its_tables_fit(tmp_path):
    k = real_kernel("pti-5level")
    raw = str(raw_image(k, tmp_path / "mem.raw"))
    cr3 = f"{k.cpu()['cr3']:x}"
    assert ptilab("dump", raw, "--cr3", cr3).stdout == ptilab("dump", str(k.path / "core.elf")).stdout
    refused = ptilab("audit", raw, "--cr3", cr3, "--no-la57")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "map the cpu_entry_area (0xfffffe0000000000) only when walked with 5-level" in refused.stderr
