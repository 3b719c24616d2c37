"""ptilab boot on real kernels: Debian's images as the fixture builder unpacked
them, booted the way the matrix does not (another -cpu, 5-level on 5.10), and
the refusals (a panic, a silent console, SIGTERM half-way), with no QEMU left
running after any of them. One boot at a time: each takes 15-60 s of TCG."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ptilab.guest.capture import KVM_PROBE
from tests.realkernel.conftest import real_kernel

PTILAB = [sys.executable, "-m", "ptilab.cli"]


def vmlinuz(config: str) -> Path:
    """The kernel the config boots, unpacked by build.py (built, skipped or failed as its fixture is)."""
    return Path(real_kernel(config).meta["vmlinuz"])


def ptilab(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*PTILAB, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def qemus_of(work_marker: str) -> list[str]:
    """QEMU processes whose command line names work_marker (a directory of this test's own)."""
    found = subprocess.run(["pgrep", "-af", f"qemu-system-x86_64.*{work_marker}"], capture_output=True, text=True)
    return found.stdout.splitlines()


def qemu_left(done_out: Path) -> list[str]:
    """QEMU still running with the work directory boot.json names (none may be)."""
    meta = json.loads((done_out / "boot.json").read_text())
    work = str(Path(meta["command"][meta["command"].index("-initrd") + 1]).parent)
    return qemus_of(work)


def test_612_on_epyc_is_audited_as_audit_audits_its_core_and_kvm_falls_back_in_time(tmp_path):
    """6.12 on an AMD CPU (the matrix boots 6.12 on Intel only): the kernel leaves PTI
    off, the verdict is audit's own, and on a machine whose KVM hangs TCG takes over."""
    started = time.time()
    done = ptilab("boot", vmlinuz("6.12-pti"), "--out", tmp_path, "--cpu", "EPYC", "--json")
    elapsed = time.time() - started
    assert done.returncode in (0, 1), done.stderr
    meta = json.loads((tmp_path / "boot.json").read_text())
    assert meta["release"] == "6.12.118+deb13-amd64" or meta["release"].startswith("6.12.")
    assert f"under {meta['accel'].upper()}" in done.stderr
    if meta["accel"] == "tcg" and os.access("/dev/kvm", os.R_OK | os.W_OK):
        assert "KVM did not get the kernel to its first console line" in meta["accel_reason"]
        assert meta["seconds"]["probe"] < KVM_PROBE + 5  # the probe gave up on time, not at the boot deadline
    assert not qemu_left(tmp_path)
    audited = ptilab("audit", tmp_path / "core.elf", "--json")
    assert (done.returncode, done.stdout) == (audited.returncode, audited.stdout)
    report = json.loads(done.stdout)
    assert "Not affected" in meta["meltdown"]  # the kernel's own word: AMD needs no PTI
    assert {f["id"] for f in report["findings"]} >= {"PTI-OFF"}
    assert done.returncode == 1 and elapsed < 600
    for cpu in meta["cpus"]:
        assert (tmp_path / f"cpu{cpu['index']}.info_tlb.txt").stat().st_size > 0
        assert (tmp_path / f"cpu{cpu['index']}.info_mem.txt").stat().st_size > 0
    assert "Linux version 6.12" in (tmp_path / "console.txt").read_text()


def test_cloud_61_under_5_level_paging_passes_with_pti_on(tmp_path):
    """Debian's 6.1 cloud flavour under LA57: the matrix boots it 4-level only.
    (5.10 would not do: Debian builds it without CONFIG_X86_5LEVEL, and it stays 4-level on an LA57 CPU.)"""
    done = ptilab("boot", vmlinuz("6.1-cloud-pti"), "--out", tmp_path, "--la57", "--nokaslr", "--append", "pti=on",
                  "--accel", "tcg")
    assert done.returncode == 0, done.stderr + done.stdout
    assert "5-level)" in done.stdout and "a Linux PTI pair" in done.stdout
    meta = json.loads((tmp_path / "boot.json").read_text())
    assert meta["accel"] == "tcg" and "nokaslr" in meta["append"].split() and meta["cpu_model"].endswith(",+la57")
    assert all(cpu["cr4"] & 1 << 12 for cpu in meta["cpus"])  # CR4.LA57
    assert not list(tmp_path.glob("cpu*.info_mem.txt"))  # QEMU 7.2's info mem walks nothing on LA57
    assert list(tmp_path.glob("cpu*.info_tlb.txt"))
    assert not qemu_left(tmp_path)


def test_a_kernel_that_panics_is_refused_with_the_panic_line(tmp_path):
    # no /init to run: the kernel tries a root file system it has not got, and panics
    done = ptilab("boot", vmlinuz("pti-4level"), "--out", tmp_path, "--accel", "tcg",
                  "--append", "rdinit=/nonexistent")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("ptilab: error: the kernel panicked: ") and "Kernel panic" in done.stderr
    assert "VFS: Unable to mount root fs" in done.stderr
    assert not (tmp_path / "core.elf").exists() and (tmp_path / "console.txt").exists()
    assert not qemus_of(str(tmp_path))


def test_a_kernel_that_prints_nothing_is_refused_at_the_deadline(tmp_path):
    """A bzImage whose header is whole but whose compressed kernel is zeros: the
    decompressor halts before any console exists."""
    real = vmlinuz("pti-4level").read_bytes()
    setup = (real[0x1F1] + 1) * 512
    broken = tmp_path / "bzImage"
    broken.write_bytes(real[:setup] + bytes(len(real) - setup))
    started = time.time()
    done = ptilab("boot", broken, "--out", tmp_path / "out", "--accel", "tcg", "--timeout", "15")
    assert done.returncode == 2
    assert done.stderr == "ptilab: error: the guest printed nothing on its serial console in 15 s\n"
    assert time.time() - started < 60
    assert not qemus_of(str(tmp_path))


def test_sigterm_during_the_boot_kills_qemu(tmp_path):
    boot = subprocess.Popen([*PTILAB, "boot", str(vmlinuz("pti-4level")), "--out", str(tmp_path), "--accel", "tcg"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        children: list[str] = []
        while not children and time.time() < deadline and boot.poll() is None:
            time.sleep(0.2)
            children = subprocess.run(["pgrep", "-P", str(boot.pid), "qemu"], capture_output=True,
                                      text=True).stdout.split()
        assert children, "QEMU never started"
        time.sleep(1)
        boot.send_signal(signal.SIGTERM)
        _, err = boot.communicate(timeout=30)
    finally:
        if boot.poll() is None:
            boot.kill()
    assert boot.returncode == 128 + signal.SIGTERM and err.strip() == "ptilab: terminated"
    assert not any(Path(f"/proc/{pid}").exists() for pid in children)


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no usable /dev/kvm")
def test_accel_kvm_boots_under_kvm_or_refuses_after_the_probe(tmp_path):
    started = time.time()
    done = ptilab("boot", vmlinuz("pti-4level"), "--out", tmp_path, "--accel", "kvm", "--timeout", "120")
    if done.returncode == 2:  # this project's machines: nested KVM hangs in the boot loader
        assert "KVM did not get the kernel to its first console line" in done.stderr
        assert time.time() - started < KVM_PROBE + 30
    else:
        assert "under KVM" in done.stdout, done.stderr
    assert not qemus_of(str(tmp_path))
