"""Scanning a synthetic image whose every root and decoy sits at a known address."""

import json
import os
import subprocess
import sys

import pytest

from ptilab.scan import scan_image
from ptilab.scan.spaces import KERNEL_ONLY, PTI_PAIR
from tests.scan.images import write_fleet_image


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    return write_fleet_image(str(tmp_path_factory.mktemp("scan") / "fleet.elf"))


@pytest.fixture(scope="module")
def scanned(fleet):
    return scan_image(fleet.path)


def _by_pgd(result):
    return {s.kernel_pgd: s for s in result.spaces}


def test_every_process_is_found_as_a_pti_pair(fleet, scanned):
    spaces = _by_pgd(scanned)
    for pgd in fleet.processes + [fleet.planted, fleet.ldt, fleet.accessed]:
        assert spaces[pgd].kind == PTI_PAIR
        assert spaces[pgd].user_pgd == pgd + 4096
    assert scanned.reference.source.startswith("CPU 0")


def test_decoys_are_not_roots_and_a_table_outside_memory_is_rejected(fleet, scanned):
    spaces = _by_pgd(scanned)
    assert fleet.decoy_slot not in spaces and fleet.decoy_slot not in scanned.rejected
    assert fleet.decoy_outside not in spaces
    assert "past the end of physical memory" in scanned.rejected[fleet.decoy_outside]
    assert spaces[fleet.odd].kind == KERNEL_ONLY and spaces[fleet.odd].user_pgd is None
    # the user PGD of a pair is never a root of its own
    assert not any(s.kernel_pgd == p + 4096 for s in scanned.spaces for p in fleet.processes)


def test_only_the_planted_process_is_flagged(fleet, scanned):
    flagged = {s.kernel_pgd for s in scanned.spaces if any(f.id == "PTI-OFF" for f in s.findings)}
    assert flagged == {fleet.planted}
    assert _by_pgd(scanned)[fleet.planted].user_view["other kernel"] >= 1 << 30  # the whole direct map


def test_without_cpu_notes_the_most_common_kernel_half_is_the_reference(tmp_path, fleet, scanned):
    bare = write_fleet_image(str(tmp_path / "bare.elf"), with_cpus=False)
    result = scan_image(bare.path)
    assert "frames share" in result.reference.source
    assert result.reference.pti
    assert {(s.kernel_pgd, s.kind, s.verdict) for s in result.spaces} == \
        {(s.kernel_pgd, s.kind, s.verdict) for s in scanned.spaces}


def test_the_same_answer_from_small_chunks(fleet, scanned):
    result = scan_image(fleet.path, chunk_frames=1000)  # chunk edges fall inside the pairs
    assert [(s.kernel_pgd, s.verdict) for s in result.spaces] == [(s.kernel_pgd, s.verdict) for s in scanned.spaces]


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.abspath("src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "ptilab.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_json_gives_each_address_space_its_pgds_in_hex(fleet):
    run = _cli("scan", fleet.path, "--json")
    assert run.returncode == 1, run.stderr  # the planted process is critical
    doc = json.loads(run.stdout)
    pairs = {s["kernel_pgd"]: s["user_pgd"] for s in doc["address_spaces"]}
    assert pairs[hex(fleet.planted)] == hex(fleet.planted + 4096)
    assert doc["address_spaces"][0]["kernel_pgd"].startswith("0x")


def test_cli_fail_on_critical_still_fails_for_the_planted_process(fleet):
    table = _cli("scan", fleet.path, "--fail-on", "critical", "--cpu-meltdown", "affected")
    assert table.returncode == 1
    row = next(line for line in table.stdout.splitlines() if line.startswith(hex(fleet.planted)))
    assert "critical: PTI-OFF" in row and hex(fleet.planted + 4096) in row
    assert "affected by Meltdown (--cpu-meltdown: 'affected')" in table.stdout


def test_without_a_word_on_the_cpu_the_planted_process_is_high_not_critical(fleet):
    table = _cli("scan", fleet.path, "--fail-on", "critical")
    assert table.returncode == 0
    row = next(line for line in table.stdout.splitlines() if line.startswith(hex(fleet.planted)))
    assert "high: PTI-OFF" in row
    assert "Meltdown exposure unknown" in table.stdout


def test_cli_refuses_a_missing_image_in_one_line():
    run = _cli("scan", "/nonexistent.core")
    assert run.returncode == 2
    assert run.stderr.startswith("ptilab: error: /nonexistent.core: cannot read") and run.stderr.count("\n") == 1


def test_a_sparse_image_says_how_much_of_it_was_read(fleet, scanned):
    """The holes of a sparse file are skipped (a hole reads as zeros, which match
    no kernel half): the scan covers all 1 GiB and reads only the allocated blocks."""
    allocated = os.stat(fleet.path).st_blocks * 512
    assert scanned.bytes_scanned == 1 << 30
    assert 0 < scanned.bytes_read <= allocated < 1 << 27
    done = subprocess.run([sys.executable, "-m", "ptilab.cli", "scan", fleet.path], capture_output=True, text=True)
    assert f"1.0 GiB ({scanned.bytes_read / (1 << 30):.1f} GiB of data, holes skipped)" in done.stdout
