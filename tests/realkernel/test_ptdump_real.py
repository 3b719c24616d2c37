"""ptilab's ptdump text of real Debian boots, held to what Linux's own ptdump prints there."""

import json
import subprocess
import sys

import pytest

from ptilab.formats.ptdump import format_walk, linux_markers
from ptilab.linux.memory_layout import NOKASLR_BASES, has_espfix, layout_from_symbols, layout_from_tables
from ptilab.paging import walk
from tests.realkernel.conftest import PTI_CONFIGS, assert_same_but_accessed_bits, real_kernel


def _user_text(config: str) -> str:
    k = real_kernel(config)
    return format_walk(walk(k.mem, k.cpu()["cr3"], k.geometry), linux_markers(k.geometry))


def test_a_four_level_boot_labels_its_top_level_pgd_and_never_p4d():
    levels = {line.split()[-1] for line in _user_text("pti-4level").splitlines() if line.startswith("0x")}
    assert levels == {"pgd", "pud", "pmd", "pte"}


def test_a_five_level_boot_has_pgd_and_p4d_lines():
    levels = {line.split()[-1] for line in _user_text("pti-5level").splitlines() if line.startswith("0x")}
    assert levels == {"pgd", "p4d", "pud", "pmd", "pte"}


# Every PTI fixture the kernel's own ptdump was taken on (the oracle module, see build.py).
ORACLE_CONFIGS = PTI_CONFIGS


def _oracle(config: str):
    k = real_kernel(config)
    if not k.meta.get("oracle"):
        pytest.skip(f"{config}: no oracle ptdump ({k.meta.get('oracle_error') or 'built before the oracle'})")
    pgd = int((k.path / "oracle_task.txt").read_text().split()[2], 16)
    return k, pgd


def ptilab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ptilab.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("config", ORACLE_CONFIGS)
def test_the_user_pgd_prints_byte_for_byte_what_the_kernels_ptdump_printed(config):
    """The pgd label, the KASLR markers inferred from the kernel tables, and the
    ESPfix marker only where the kernel has ESPfix (not the cloud flavour).

    The task is stopped, but the kernel may still clear the Accessed bit of its
    pages between the oracle's read and the freeze (reclaim's folio_referenced();
    seen once on 7.2: two text pages of 16): ptdump then splits a line there. Where
    the texts differ, they must be the same once lines printing the same flags are
    joined, and the frozen tables must differ in the Accessed bit alone at each
    line start only one of them has."""
    k, pgd = _oracle(config)
    done = ptilab("dump", str(k.path / "core.elf"), "--cr3", f"{pgd + 0x1000:x}")
    assert done.returncode == 0, done.stderr
    text, oracle = done.stdout, (k.path / "oracle_user.txt").read_text()
    if text != oracle:
        assert_same_but_accessed_bits(text, oracle, walk(k.mem, pgd + 0x1000, k.geometry))


@pytest.mark.parametrize("config", [c for c in ORACLE_CONFIGS if "kaslr" in c or "5level" in c])
def test_kaslr_bases_from_the_tables_equal_the_kernels_variables(config):
    k, pgd = _oracle(config)
    kernel = walk(k.mem, pgd, k.geometry, top_slots=(256, 512))
    from_tables = layout_from_tables(kernel)
    assert from_tables is not None
    assert from_tables.bases() == layout_from_symbols(k.mem, pgd, k.geometry, k.symbols).bases()
    if k.meta["kaslr"]:
        assert from_tables.bases() != NOKASLR_BASES[k.geometry.levels]


@pytest.mark.parametrize("config", ["pti-4level", "6.1-cloud-pti", "6.1-cloud-pti-kaslr", "6.12-pti"])
def test_espfix_is_found_exactly_where_the_kernel_was_built_with_it(config):
    k = real_kernel(config)
    kernel = walk(k.mem, k.cpu()["cr3"] & ~0x1FFF, k.geometry, top_slots=(256, 512))
    built_with = "init_espfix_ap" in k.symbols  # arch/x86/kernel/espfix_64.c, only with CONFIG_X86_ESPFIX64
    assert has_espfix(kernel) == built_with == ("cloud" not in config)


def test_the_bases_can_be_given_or_read_through_the_symbols():
    k, pgd = _oracle("pti-kaslr")
    core, user = str(k.path / "core.elf"), f"{pgd + 0x1000:x}"
    oracle = (k.path / "oracle_user.txt").read_text()
    assert ptilab("dump", core, "--cr3", user, "--system-map", str(k.path / "kallsyms.txt")).stdout == oracle
    bases = layout_from_tables(walk(k.mem, pgd, k.geometry, top_slots=(256, 512))).bases()
    given = ptilab("dump", core, "--cr3", user, "--kaslr-bases", ",".join(f"{v:x}" for v in bases.values()))
    assert given.stdout == oracle
    nokaslr = ",".join(f"{v:x}" for v in NOKASLR_BASES[4].values())
    assert ptilab("dump", core, "--cr3", user, "--kaslr-bases", nokaslr).stdout != oracle
    bad = ptilab("dump", core, "--cr3", user, "--kaslr-bases", "1,2")
    assert bad.returncode == 2 and bad.stderr.startswith("ptilab: error: --kaslr-bases takes three")


@pytest.mark.parametrize("config", ["pti-4level", "pti-5level", "6.1-cloud-pti"])
def test_audit_of_the_kernels_own_ptdump_counts_the_espfix_pages_it_skipped(config):
    from ptilab.audit import audit
    from ptilab.audit.sources import views_from_image, views_from_ptdump

    k, pgd = _oracle(config)
    from_text = audit(views_from_ptdump(str(k.path / "oracle_user.txt")))
    from_image = audit(views_from_image(k.mem, pgd + 0x1000, k.geometry).views)
    summary = lambda found: next(f.explanation for f in found if f.id == "PTI-USER-VIEW")
    espfix = lambda text: text.split("the espfix stacks (")[1].split(")")[0] if "espfix" in text else None
    assert espfix(summary(from_text)) == espfix(summary(from_image))
    assert (espfix(summary(from_text)) is None) == ("cloud" in config)
    assert {f.id for f in from_text} == {f.id for f in from_image}


def test_audit_reads_what_ptilab_simulate_writes(tmp_path):
    sim = ptilab("simulate", "--cpus", "2")
    (tmp_path / "sim.txt").write_text(sim.stdout)
    done = ptilab("audit", "--ptdump", str(tmp_path / "sim.txt"), "--json")
    # A ptdump text tells nothing of KASLR: the entry text it maps is judged as if KASLR were on (exit 1).
    assert done.returncode == 1 and done.stderr == ""
    found = {f["id"]: f for f in json.loads(done.stdout)["findings"]}
    assert found["KASLR-ENTRYBLEED"]["severity"] == "medium" and "PTI-OFF" not in found
    assert "aliased 65536 times" in found["PTI-USER-VIEW"]["explanation"]


class _Frozen:
    """A stand-in for a Walk: the ranges the frozen tables hold around an address."""

    def __init__(self, *prot: int):
        import numpy as np
        self.prot = np.array(prot, dtype="<u8")

    def ranges_within(self, start, end):
        return {"prot": self.prot}


_LINE = "0x00000000005e0000-0x00000000005e{0}000          {1}K USR ro                     NX pte\n"


def test_churn_where_the_frozen_tables_hold_one_range_is_judged_not_a_crash():
    # The kernel's text split a line at 0x5e3000 (the Accessed bit differed when it read the
    # tables); the frozen tables, read later, hold one range there. Seen once on 7.2-pti-kaslr.
    ours = _LINE.format(6, 24)
    kernels = _LINE.format(3, 12) + _LINE.replace("5e0000-", "5e3000-").format(6, 12)
    assert_same_but_accessed_bits(ours, kernels, _Frozen(0x25))  # one range: churn, accepted
    with pytest.raises(AssertionError, match="inside one range"):  # ptilab may not split where its tables do not
        assert_same_but_accessed_bits(kernels, ours, _Frozen(0x25))
    assert_same_but_accessed_bits(ours, kernels, _Frozen(0x25, 0x05))  # two ranges, Accessed alone differs
    with pytest.raises(AssertionError, match="more than the Accessed bit"):
        assert_same_but_accessed_bits(ours, kernels, _Frozen(0x25, 0x27))
