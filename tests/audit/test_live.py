"""`ptilab audit --live` and `dump --live` on fake roots: /proc/kcore files over the Debian 6.1
fixtures' real page tables, with the kernel's claims written as the kernel writes them."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import pytest

from ptilab.audit.live import check_claims, compare_current_user, open_live
from ptilab.errors import InputError
from ptilab.formats.ptdump import format_walk, linux_markers
from ptilab.linux.live import Claims, pti_requested, read_claims
from ptilab.paging import walk
from tests.memory.fake_kcore import fake_root
from tests.realkernel.conftest import real_kernel
from tests.realkernel.live import AS_NOBODY

SRC = str(Path(__file__).resolve().parents[2] / "src")
ENABLED = "Kernel/User page tables isolation: enabled"
DISABLED = "Kernel/User page tables isolation: disabled on command line."


def ptilab(*args, nobody=False):
    env = dict(os.environ, PYTHONPATH=SRC, NO_COLOR="1", COLUMNS="200")
    cmd = [sys.executable, "-c", AS_NOBODY] if nobody else [sys.executable, "-m", "ptilab.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    real_kernel("pti-4level"), real_kernel("pti-off")  # built on demand, skipped or failed as fixture tests are
    base = tmp_path_factory.mktemp("roots")
    return {
        "pti": fake_root(base / "pti", "pti-4level"),
        "off": fake_root(base / "off", "pti-off", meltdown="Vulnerable", pti_flag=False, log=DISABLED),
        "off-claims-pti": fake_root(base / "lie", "pti-off", cmdline="console=ttyS0 nokaslr"),
        "pti-claims-off": fake_root(base / "modest", "pti-4level", meltdown="Vulnerable", pti_flag=False, log=DISABLED,
                                    cmdline="console=ttyS0 nopti"),
        "off-asked-on": fake_root(base / "ignored", "pti-off", meltdown="Vulnerable", pti_flag=False, log=None,
                                  cmdline="console=ttyS0 pti=on"),
        "flags-disagree": fake_root(base / "mixed", "pti-4level", pti_flag=False),
    }


def audit(root):
    done = ptilab("audit", "--live", str(root), "--json")
    assert done.stderr == ""
    return done.returncode, json.loads(done.stdout)


def ids(report):
    return {f["id"]: f["severity"] for f in report["findings"]}


def test_a_pti_kernel_whose_claims_agree_passes(roots):
    code, report = audit(roots["pti"])
    assert code == 0 and report["pti_pair"]["is_pti"]
    assert report["pti_pair"]["kernel_pgd"] == "0x2a10000" and report["live"]["release"] == "6.1.0-57-amd64"
    assert ids(report) == {"PTI-CEA-FIXED": "low", "PTI-USER-VIEW": "info", "CLAIMS-AGREE": "info",
                           "KASLR-OFF": "info"}
    machine = report["machine"]
    assert machine["meltdown"] == "affected" and machine["kaslr"] is False
    assert machine["meltdown_evidence"][0] == {"source": "vulnerabilities/meltdown", "says": "Mitigation: PTI"}
    claims = report["live"]["claims"]
    assert claims["says_pti"] == {"vulnerabilities/meltdown": True, "cpuinfo pti flag": True, "kernel log": True}


def test_the_live_user_view_is_the_dumps_user_view_of_init_mm(roots):
    """The same tables, read through kcore and through the QEMU core: the same ranges."""
    k = real_kernel("pti-4level")
    _, live = audit(roots["pti"])
    core = ptilab("audit", str(k.path / "core.elf"), "--cr3", "2a10000", "--system-map", str(k.path / "kallsyms.txt"),
                  "--json")
    assert live["user_view"] == json.loads(core.stdout)["user_view"]


@pytest.mark.parametrize("root,expected,code", [
    ("off", {"PTI-OFF": "critical", "CLAIMS-AGREE": "info"}, 1),
    ("off-claims-pti", {"PTI-OFF": "critical", "CLAIM-PTI-UNBACKED": "critical"}, 1),
    ("pti-claims-off", {"CLAIM-PTI-UNREPORTED": "low"}, 0),
    ("off-asked-on", {"PTI-OFF": "critical", "PTI-REQUEST-IGNORED": "high"}, 1),
    ("flags-disagree", {"CLAIMS-DISAGREE": "medium", "CLAIM-PTI-UNREPORTED": "low"}, 1),
])
def test_claims_are_held_against_the_tables(roots, root, expected, code):
    got_code, report = audit(roots[root])
    found = ids(report)
    assert got_code == code
    assert {k: found.get(k) for k in expected} == expected
    assert not {"CLAIM-PTI-UNBACKED", "CLAIM-PTI-UNREPORTED", "CLAIMS-DISAGREE", "PTI-REQUEST-IGNORED",
                "CLAIMS-AGREE"} - set(expected) & set(found)


def test_the_text_report_names_the_running_kernel(roots):
    done = ptilab("audit", "--live", str(roots["pti"]))
    lines = done.stdout.splitlines()
    assert done.returncode == 0
    assert lines[0].startswith("running kernel 6.1.0-57-amd64: ") and "init_top_pgt at 0x2a10000, 4-level" in lines[0]
    assert "CLAIMS-AGREE" in done.stdout


def test_dump_live_prints_init_mms_user_tables_as_the_core_does(roots):
    k = real_kernel("pti-4level")
    live = ptilab("dump", "--live", str(roots["pti"]))
    core = ptilab("dump", str(k.path / "core.elf"), "--cr3", "2a11000")
    assert live.returncode == core.returncode == 0 and live.stdout == core.stdout
    kernel = ptilab("dump", "--live", str(roots["pti"]), "--cr3", "2a10000", "--format", "qemu")
    assert kernel.stdout == ptilab("dump", str(k.path / "core.elf"), "--cr3", "2a10000", "--format", "qemu").stdout


def test_debugfs_current_user_is_compared_with_the_walk(tmp_path):
    k = real_kernel("pti-4level")
    # A process's user PGD (the user CPU's CR3): its kernel half is init_mm's, its user half its own.
    process = walk(k.mem, k.cpu()["cr3"], k.geometry)
    text = format_walk(process, linux_markers(k.geometry))
    root = fake_root(tmp_path / "r", "pti-4level", current_user=text)
    _, report = audit(root)
    assert ids(report)["PTDUMP-AGREES"] == "info"
    init_user = walk(k.mem, 0x2A11000, k.geometry)
    assert compare_current_user(text, "current_user", init_user).id == "PTDUMP-AGREES"
    changed = text.replace("RW                 GLB NX pte", "RW                     NX pte", 1)
    assert changed != text
    bad = compare_current_user(changed, "current_user", init_user)
    assert bad.id == "PTDUMP-DISAGREES" and "first difference at line" in bad.explanation


# -- refusals: one line, exit 2, which and what would work ----------------------------------

def refusal(root, **kw):
    done = ptilab("audit", "--live", str(root), **kw)
    assert done.returncode == 2 and done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("ptilab: error: ")
    return done.stderr


def test_no_kcore_in_a_container_says_so(tmp_path):
    root = fake_root(tmp_path, "pti-4level", kcore=False)
    assert "CONFIG_PROC_KCORE" in refusal(root)
    (root / ".dockerenv").write_text("")
    message = refusal(root)
    assert "container" in message and "(/.dockerenv exists)" in message and "run ptilab on the host" in message
    assert "dump-guest-memory" in message
    # What is known comes before the guess: no kcore; and the kernel's own config, where it says so, decides.
    why = message.partition("does not exist: ")[2]
    assert why.index("offers no kcore") < why.index("container")


def test_a_microvm_kernel_whose_config_leaves_kcore_out_is_named_before_any_container_guess(tmp_path):
    import gzip

    root = fake_root(tmp_path, "pti-4level", kcore=False)
    (root / ".dockerenv").write_text("")  # a microVM image built from a container's root filesystem
    (root / "proc/config.gz").write_bytes(gzip.compress(b"CONFIG_PROC_FS=y\n# CONFIG_PROC_KCORE is not set\n"))
    message = refusal(root)
    assert "no kcore: " in message and "proc/config.gz says CONFIG_PROC_KCORE is not set" in message
    assert "container" not in message.partition("does not exist: ")[2]


def test_no_procfs_is_refused(tmp_path):
    assert "is not a mounted procfs" in refusal(tmp_path)


def test_not_root_is_refused():
    if os.geteuid() != 0:
        pytest.skip("dropping to nobody needs root")
    with tempfile.TemporaryDirectory() as tmp:  # pytest's tmp_path lies in a directory closed to nobody
        os.chmod(tmp, 0o755)
        root = fake_root(Path(tmp) / "r", "pti-4level")
        os.chmod(root / "proc/kcore", 0o400)  # as /proc/kcore is: r-------- root root
        done = ptilab("audit", "--live", str(root), nobody=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "only root may read it" in done.stderr and "sudo" in done.stderr


def test_lockdown_is_named(roots, tmp_path):
    """The kernel refuses kcore under lockdown=confidentiality with EPERM, to root too (the guest test does it for real)."""
    root = fake_root(tmp_path / "r", "pti-4level")
    lockdown = root / "sys/kernel/security"
    lockdown.mkdir(parents=True)
    (lockdown / "lockdown").write_text("none integrity [confidentiality]\n")
    real_open = os.open

    def kernel_open(path, *args, **kw):
        if str(path).endswith("proc/kcore"):
            raise PermissionError(1, "Operation not permitted")
        return real_open(path, *args, **kw)

    with mock.patch("os.open", kernel_open), pytest.raises(InputError) as err:
        open_live(root)
    assert "lockdown is in confidentiality mode" in str(err.value) and "LOCKDOWN_KCORE" in str(err.value)
    (lockdown / "lockdown").write_text("none [integrity] confidentiality\n")
    with mock.patch("os.open", kernel_open), pytest.raises(InputError, match="CAP_SYS_RAWIO is missing"):
        open_live(root)


def test_a_kcore_without_vmcoreinfo_is_refused(tmp_path):
    from tests.memory.fake_kcore import write_kcore

    root = fake_root(tmp_path, "pti-4level", kcore=False)
    write_kcore(root / "proc/kcore", [(0, 0x100000)], {}, None)
    assert "no VMCOREINFO note (Linux 4.19 added it)" in refusal(root)


def test_live_refuses_image_options(roots):
    done = ptilab("audit", "--live", str(roots["pti"]), "--cpu", "1")
    assert done.returncode == 2 and "--cpu" in done.stderr
    done = ptilab("audit", "core.elf", "--live", str(roots["pti"]))
    assert done.returncode == 2 and "give an IMAGE or --live, not both" in done.stderr


# -- the claims themselves -----------------------------------------------------------------

@pytest.mark.parametrize("cmdline,mode", [
    ("quiet", "auto"), ("pti=on nopti", "on"), ("nopti", "off"), ("mitigations=off", "off"),
    ("mitigations=auto,nosmt", "auto"), ("pti=off pti=auto", "auto"), ("pti=auto mitigations=off", "auto"),
    ("quiet -- nopti", "auto"), ("pti=bogus nopti", "off"),
])
def test_the_command_line_is_read_as_pti_check_boottime_disable_reads_it(cmdline, mode):
    assert pti_requested(cmdline) == mode


def test_unreadable_sources_say_nothing(tmp_path):
    claims = read_claims(tmp_path)
    assert claims == Claims(None, None, None, None)
    assert set(claims.says_pti().values()) == {None}
    (finding,) = check_claims(claims, isolated=True)
    assert finding.id == "CLAIMS-AGREE" and "unread" not in finding.explanation


def test_xen_pv_counts_as_pti_off():
    claims = Claims("Unknown (XEN PV detected, hypervisor mitigation required)", False, ("disabled on XEN PV.",), "")
    assert [f.id for f in check_claims(claims, isolated=True)] == ["CLAIM-PTI-UNREPORTED"]
    assert [f.id for f in check_claims(claims, isolated=False)] == ["CLAIMS-AGREE"]
