"""The verdict knows the machine: on every boot of the matrix, the audit's word on the
CPU is the guest's own (its vulnerabilities/meltdown, captured at build time), rests on
lines the guest really logged, and sets PTI-OFF's severity and the KASLR findings by it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.realkernel.conftest import REAL_CONFIGS, real_kernel

SYSFS = {"Not affected": "not affected", "Mitigation: PTI": "affected", "Vulnerable": "affected"}
PTI_OFF = {"affected": "critical", "not affected": "info"}


def _audit(path) -> tuple[int, dict]:
    done = subprocess.run([sys.executable, "-m", "ptilab.cli", "audit", "--json", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def _sysfs_meltdown(k) -> str:
    lines = (k.path / "vulnerabilities.txt").read_text().splitlines()
    (line,) = [l for l in lines if l.startswith("/sys/devices/system/cpu/vulnerabilities/meltdown:")]
    return line.partition(":")[2].strip()


@pytest.mark.parametrize("config", REAL_CONFIGS)
def test_the_verdict_follows_the_cpus_exposure_and_names_its_evidence(config):
    k = real_kernel(config)
    code, report = _audit(k.path / "core.elf")
    machine = report["machine"]
    assert machine["meltdown"] == SYSFS[_sysfs_meltdown(k)]
    dmesg = (k.path / "dmesg.txt").read_text()
    assert machine["meltdown_evidence"] and all(e["source"] == "the kernel log" and e["says"] in dmesg
                                                for e in machine["meltdown_evidence"])
    assert machine["kaslr"] == k.meta["kaslr"]
    found = {f["id"]: f["severity"] for f in report["findings"]}
    if k.meta["pti"]:
        assert "PTI-OFF" not in found
    else:
        assert found["PTI-OFF"] == PTI_OFF[machine["meltdown"]]
    assert code == (1 if any(s in ("medium", "high", "critical") for s in found.values()) else 0)


@pytest.mark.parametrize("config", REAL_CONFIGS)
def test_kaslr_leaks_are_named_where_kaslr_is_on(config):
    k = real_kernel(config)
    _, report = _audit(k.path / "core.elf")
    found = {f["id"]: f for f in report["findings"]}
    if not k.meta["kaslr"]:
        assert "KASLR-OFF" in found and "KASLR-ENTRYBLEED" not in found and "KASLR-KERNEL-MAPPED" not in found
        return
    slide = int(report["kaslr_slide"], 16)
    assert slide and report["vmcoreinfo"]["kernel_offset"] == report["kaslr_slide"]
    if k.meta["pti"]:
        bleed = found["KASLR-ENTRYBLEED"]
        assert bleed["severity"] == "medium" and "CVE-2022-4543" in bleed["explanation"]
        # its span is the entry text at the slid address
        assert int(bleed["spans"][0]["start"], 16) <= k.symbols["entry_SYSCALL_64"] < int(bleed["spans"][0]["end"], 16)
    else:
        assert found["KASLR-KERNEL-MAPPED"]["severity"] == "medium"


def test_an_amd_cpu_without_pti_is_no_critical_and_says_why():
    k = real_kernel("epyc-auto-kaslr")
    for name in ("core.elf", "kdump-zlib.dump", "kdump.elf", "makedumpfile-lzo.dump"):
        _, report = _audit(k.path / name)
        (off,) = [f for f in report["findings"] if f["id"] == "PTI-OFF"]
        assert off["severity"] == "info" and "AMD EPYC" in off["explanation"], name
        assert not [f for f in report["findings"] if f["severity"] in ("high", "critical")], name
