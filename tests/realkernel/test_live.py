"""`ptilab audit --live` run for real: inside QEMU guests of Debian's 6.1 and 7.2 kernels (pti=on,
KASLR on), its verdict and user view held against the audit of a dump of the same guest."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ptilab.audit.findings import Severity
from ptilab.audit.live import compare_current_user
from ptilab.memory.images import open_image
from ptilab.paging import Geometry, walk

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
SRC = str(HERE.parents[1] / "src")
OWN = ("CLAIMS-", "CLAIM-", "PTDUMP-", "PTI-REQUEST")  # findings only a live audit makes


sys.path.insert(0, str(HERE))
import live as live_guest  # noqa: E402  (tests/realkernel/live.py)
from tests.realkernel.build import CONFIGS  # noqa: E402


def _guest(config: str) -> Path:
    dest = OUT / config
    if not live_guest.up_to_date(dest):
        done = subprocess.run([sys.executable, str(HERE / "live.py"), "--out", str(OUT), "--config", config],
                              capture_output=True, text=True)
        if done.returncode:
            reason = f"the live guest could not run: {done.stderr.strip()[-300:]}"
            if os.environ.get("CI"):
                pytest.fail(reason)
            pytest.skip(reason)
    return dest


@pytest.fixture(scope="module", params=sorted(live_guest.LIVE_CONFIGS))
def guest(request) -> Path:
    return _guest(request.param)


def _exit_for(findings: list[dict]) -> int:
    """The exit status `ptilab audit` owes these findings at its default --fail-on medium."""
    return int(any(Severity.parse(f["severity"]) >= Severity.MEDIUM for f in findings))


def test_audit_live_ran_as_root_in_the_guest(guest):
    report = json.loads((guest / "live.json").read_text())
    # PTI with KASLR leaves the entry text mapped: KASLR-ENTRYBLEED (medium) makes the audit exit 1.
    assert "KASLR-ENTRYBLEED" in {f["id"] for f in report["findings"]} and _exit_for(report["findings"]) == 1
    steps = {step: (guest / f"{step}.rc").read_text().strip() for step in ("import", "live", "text", "dump")}
    assert steps == {"import": "0", "live": "1", "text": "1", "dump": "0"}
    assert (guest / "live.err").read_text() == ""
    live = report["live"]
    assert live["source"] == "/proc/kcore" and live["release"] == (guest / "uname.txt").read_text().strip()
    assert report["pti_pair"]["is_pti"]
    # KASLR on: the slide comes from VMCOREINFO's KERNELOFFSET, not guessed
    assert int(live["kernel_offset"], 16) != 0 and report["kaslr_slide"] == live["kernel_offset"]
    assert live["claims"]["says_pti"] == {"vulnerabilities/meltdown": True, "cpuinfo pti flag": True,
                                          "kernel log": True}
    assert {f["id"] for f in report["findings"]} >= {"CLAIMS-AGREE", "PTI-USER-VIEW"}
    text = (guest / "live.txt").read_text()
    release = CONFIGS[live_guest.LIVE_CONFIGS[guest.name]].release
    assert text.startswith(f"running kernel {release}.") and "a Linux PTI pair" in text


def test_the_live_verdict_and_user_view_are_the_dumps(guest):
    """The same guest dumped by QEMU after the run, audited from outside at init_mm's PGD."""
    report = json.loads((guest / "live.json").read_text())
    env = dict(os.environ, PYTHONPATH=SRC)
    done = subprocess.run([sys.executable, "-m", "ptilab.cli", "audit", str(guest / "guest.elf"),
                           "--cr3", report["pti_pair"]["kernel_pgd"], "--json"], capture_output=True, text=True, env=env)
    dump = json.loads(done.stdout)
    assert dump["pti_pair"]["is_pti"] and done.returncode == _exit_for(dump["findings"])
    live_verdict = {(f["id"], f["severity"]) for f in report["findings"] if not f["id"].startswith(OWN)}
    assert live_verdict == {(f["id"], f["severity"]) for f in dump["findings"]}
    assert report["user_view"] == dump["user_view"]


def test_dump_live_shows_the_user_tables_the_dump_holds(guest):
    report = json.loads((guest / "live.json").read_text())
    core = open_image(guest / "guest.elf")
    user = walk(core, int(report["pti_pair"]["user_pgd"], 16), Geometry(report["live"]["levels"]))
    text = (guest / "dump_live.txt").read_text()
    assert compare_current_user(text, "dump_live.txt", user).id == "PTDUMP-AGREES"
    # KASLR moved the direct map: the marker follows page_offset_base as the kernel holds it
    assert "---[ Low Kernel Mapping ]---\n0xffff888000000000" not in text


def test_not_root_and_lockdown_are_refused_in_one_line(guest):
    nobody = (guest / "nobody.txt").read_text()
    assert (guest / "nobody.rc").read_text().strip() == "2" and nobody.count("\n") == 1
    assert nobody.startswith("ptilab: error: /proc/kcore: only root may read it")
    lockdown = (guest / "lockdown.txt").read_text()
    assert (guest / "lockdown.rc").read_text().strip() == "2" and lockdown.count("\n") == 1
    assert "kernel lockdown is in confidentiality mode" in lockdown
    assert "[confidentiality]" in (guest / "lockdown_state.txt").read_text()


def test_the_readmes_refusals_are_the_guests():
    """README shows the guest's refusals verbatim (its `sudo ptilab audit --live` block is held to
    live.txt by tests/test_readme.py, as every block to its run)."""
    guest = _guest("live")
    readme = (HERE.parents[1] / "README.md").read_text()
    for refusal in ("nobody.txt", "lockdown.txt"):
        assert (guest / refusal).read_text().strip() in readme
