"""The command line: useful by default, one-line errors with documented exit codes."""

import json
import subprocess
import sys

import pytest

from tests.realkernel.conftest import real_kernel


def ptilab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ptilab.cli", *args], capture_output=True, text=True, timeout=300)


def test_no_arguments_compares_every_design_on_the_default_kernel():
    done = ptilab()
    assert done.returncode == 0
    for design in ("explicit", "mirror", "shared-pmd", "linux"):
        assert design in done.stdout
    assert "linux-6.1, 4 CPUs" in done.stdout


def test_compare_json_lists_every_design():
    reports = json.loads(ptilab("compare", "--kernel", "kaiser-2017", "--cpus", "2", "--json").stdout)
    assert [r["design"] for r in reports] == ["explicit", "mirror", "shared-pmd", "linux"]
    assert reports[0]["ap_work"] and not reports[3]["ap_work"]


@pytest.mark.parametrize("args, words", [
    (["compare", "--kernel", "linux-9.9"], "choose one of: kaiser-2017, linux-4.15, linux-6.1"),
    (["simulate", "--design", "kaiser"], "choose one of: explicit, mirror, shared-pmd, linux"),
    (["compare", "--cpus", "9000"], "between 1 and 8192"),
    (["compare", "--kernel", "kaiser-2017", "--paging", "5"], "no 5-level layout"),
    (["compare", "--paging", "3"], "--paging must be 4 or 5"),
    (["audit", "/no/such/core"], "cannot read"),
    (["audit"], "give an IMAGE"),
    (["audit", "--fail-on", "urgent", "x"], "unknown severity"),
    (["frobnicate"], "No such command"),
])
def test_bad_input_gives_one_line_and_exit_2(args, words):
    done = ptilab(*args)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and words in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_audit_exit_code_gates_on_severity():
    ok = real_kernel("pti-4level")
    off = real_kernel("pti-off")
    assert ptilab("audit", str(ok.path / "core.elf")).returncode == 0
    assert ptilab("audit", str(ok.path / "core.elf"), "--fail-on", "low").returncode == 1  # PTI-CEA-FIXED
    done = ptilab("audit", str(off.path / "core.elf"), "--json")
    assert done.returncode == 1
    assert json.loads(done.stdout)["findings"][0]["id"] == "PTI-OFF"


def test_audit_of_a_file_that_is_not_an_image_is_a_one_line_error(tmp_path):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not memory")
    done = ptilab("audit", str(bogus), "--cr3", "1000")
    assert done.returncode == 2 and done.stderr.startswith("ptilab: error: ")


def test_dump_in_qemu_format_equals_qemus_info_mem():
    k = real_kernel("pti-4level")
    done = ptilab("dump", str(k.path / "core.elf"), "--cpu", "1", "--format", "qemu")
    assert done.returncode == 0
    assert done.stdout == (k.path / "cpu1.info_mem.txt").read_text()


def test_dump_in_ptdump_format_has_the_linux_markers():
    k = real_kernel("pti-5level")
    done = ptilab("dump", str(k.path / "core.elf"))
    assert done.returncode == 0
    for marker in ("---[ User Space ]---", "---[ CPU entry Area ]---", "---[ ESPfix Area ]---"):
        assert marker in done.stdout
    assert "entries skipped" in done.stdout
