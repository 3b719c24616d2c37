"""ptilab's audit and model judged against Debian's kernels (5.10, 6.1 generic/cloud/rt, 6.12) booted under QEMU."""

import re

import numpy as np
import pytest

from ptilab.audit import Severity, audit
from ptilab.audit.sources import views_from_image
from ptilab.compare.views import pages, rights
from ptilab.pti import boot
from ptilab.linux.profiles import CPU_ENTRY_AREA_BASE
from ptilab.paging import walk
from tests.realkernel.conftest import (KASLR_CONFIGS, PTI_CONFIGS, PTI_ON_CONFIGS, REAL_CONFIGS, nokaslr_sibling,
                                      real_kernel)


@pytest.mark.parametrize("config", REAL_CONFIGS)
def test_fixture_boots_the_debian_kernel_it_names(config):
    meta = real_kernel(config).meta
    # Debian's `uname -r`: 6.1.0-57-amd64, 6.1.0-57-rt-amd64, 6.12.118+deb13-cloud-amd64
    release, flavour = re.fullmatch(r"(\d+\.\d+)\.\d+(?:-\d+|\+deb\d+)-(cloud-|rt-)?amd64",
                                    meta["kernel_release"]).groups()
    assert (release, (flavour or "generic-").rstrip("-")) == (meta["release"], meta["flavour"])
    assert meta["kernel_package"].startswith(f"linux-image-{meta['kernel_release']} ")
    assert meta["kaslr"] == ("nokaslr" not in meta["append"].split())
    assert all(bool(c["cr4"] & (1 << 12)) == meta["la57"] for c in meta["cpus"])  # CR4.LA57


@pytest.mark.parametrize("config", PTI_CONFIGS)
def test_fixture_is_a_pti_kernel_caught_in_user_mode(config):
    pti_kernel = real_kernel(config)
    meta = pti_kernel.meta
    assert meta["pti"]
    assert pti_kernel.cpu()["cpl"] == 3
    assert pti_kernel.cpu()["cr3"] & 0x1000  # in user mode the CPU runs on the user PGD
    assert "Kernel/User page tables isolation: enabled" in (pti_kernel.path / "dmesg.txt").read_text()


def _machine_audit(k) -> list:
    """The audit as `ptilab audit core.elf` makes it: told what the dump's own log says of the machine."""
    from ptilab.audit.image import audit_image

    return list(audit_image(k.mem, str(k.path / "core.elf"), k.cpu()["cr3"], k.geometry, k.symbols).findings)


@pytest.mark.parametrize("config", PTI_ON_CONFIGS)
def test_real_pti_kernel_passes_the_audit(config):
    pti_kernel = real_kernel(config)
    found = views_from_image(pti_kernel.mem, pti_kernel.cpu()["cr3"], pti_kernel.geometry, pti_kernel.symbols)
    assert found.pair.is_pti
    findings = _machine_audit(pti_kernel)
    # KASLR on: the entry text still gives the base away (EntryBleed); nothing else is medium or worse
    assert {f.id for f in findings if f.severity >= Severity.MEDIUM} == (
        {"KASLR-ENTRYBLEED"} if pti_kernel.meta["kaslr"] else set())
    (summary,) = [f for f in findings if f.id == "PTI-USER-VIEW"]
    for words in ("cpu_entry_area", "gdt", "tss", "entry_stack_page", "estacks.DF_stack", "entry text",
                  "2 per-CPU cpu_tss_rw"):
        assert words in summary.explanation
    # Debian's cloud flavour is built without CONFIG_X86_ESPFIX64: no espfix area to name
    espfix = "init_espfix_bsp" in pti_kernel.symbols
    assert ("espfix" in summary.explanation) == espfix
    assert ("aliased 65536 times" in summary.explanation) == espfix


def test_auto_pti_without_pcid_clones_the_kernel_image_into_the_user_tables():
    """pti_clone_kernel_text(): in auto mode on a CPU without PCID, Linux maps the kernel image
    (text up to _etext) into the user tables, Global, as pti_kernel_image_global_ok() allows;
    with pti=on it does not."""
    for config, cloned in (("pti-auto-5level", True), ("pti-5level", False)):
        k = real_kernel(config)
        assert " pcid" not in (k.path / "cpuinfo.txt").read_text()
        user = walk(k.mem, k.cpu()["cr3"] | 0x1000, k.geometry)
        text = pages(user, k.symbols["_text"], k.symbols["_etext"])
        assert text["glb"].all()  # no PCID: the kernel keeps its text Global
        # pti=on maps only the entry text, whole PMDs of it (pti_clone_entry_text())
        pmd = 1 << 21
        entry = range(k.symbols["__entry_text_start"] & -pmd, -(-k.symbols["__entry_text_end"] // pmd) * pmd)
        outside_entry = [va for va in text["va"].tolist() if va not in entry]
        assert len(text) == (-(-(k.symbols["_etext"] - k.symbols["_text"]) // 4096) if cloned else len(entry) // 4096)
        assert bool(outside_entry) == cloned
    found = views_from_image(k.mem, k.cpu()["cr3"], k.geometry, k.symbols)
    assert "PTI-KERNEL-IMAGE" not in {f.id for f in audit(found.views)}
    auto = real_kernel("pti-auto-5level")
    found = views_from_image(auto.mem, auto.cpu()["cr3"], auto.geometry, auto.symbols)
    assert "PTI-KERNEL-IMAGE" in {f.id for f in audit(found.views)}


def test_pti_off_boot_is_flagged_as_exposing_the_kernel():
    k = real_kernel("pti-off")
    found = views_from_image(k.mem, k.cpu()["cr3"], k.geometry, k.symbols)
    assert not found.pair.is_pti
    top = _machine_audit(k)[0]
    assert top.id == "PTI-OFF" and top.severity is Severity.CRITICAL
    assert "direct map" in top.explanation


@pytest.mark.parametrize("config", KASLR_CONFIGS)
def test_kaslr_slide_is_inferred_from_the_entry_text_in_the_user_tables(config):
    unslid = real_kernel(nokaslr_sibling(config)).symbols
    k = real_kernel(config)
    found = views_from_image(k.mem, k.cpu()["cr3"], k.geometry, unslid)
    assert found.kaslr_slide == k.symbols["_text"] - unslid["_text"]
    assert found.kaslr_slide != 0


def test_real_cpu_entry_area_matches_the_linux_6_1_profile_page_for_page(pti_kernel):
    real = walk(pti_kernel.mem, pti_kernel.cpu()["cr3"], pti_kernel.geometry)
    model_kernel = boot("linux-6.1", "linux", cpus=2, levels=pti_kernel.geometry.levels)
    model = walk(model_kernel.ram, model_kernel.user_cr3(), model_kernel.geometry)
    span = (CPU_ENTRY_AREA_BASE, CPU_ENTRY_AREA_BASE + (1 << 39))
    real_pages, model_pages = pages(real, *span), pages(model, *span)
    as_offsets = lambda p: [(int(va) - CPU_ENTRY_AREA_BASE, rights(int(eff)), bool(g))
                            for va, eff, g in zip(p["va"], p["eff"], p["glb"])]
    assert as_offsets(real_pages) == as_offsets(model_pages)
    # The TSS pages alias cpu_tss_rw; the model's frames differ, the aliasing must not.
    assert len(np.unique(real_pages["pa"])) == len(np.unique(model_pages["pa"]))


def test_model_user_view_has_the_real_kernels_shape(pti_kernel):
    real = walk(pti_kernel.mem, pti_kernel.cpu()["cr3"], pti_kernel.geometry, top_slots=(256, 512))
    k = boot("linux-6.1", "linux", cpus=2, levels=pti_kernel.geometry.levels)
    model = walk(k.ram, k.user_cr3(), k.geometry, top_slots=(256, 512))
    assert real.table_pages() == model.table_pages()
    assert int(real.mapped["size"].sum()) == int(model.mapped["size"].sum())


@pytest.mark.parametrize("config", PTI_CONFIGS)
def test_meltdown_through_the_real_user_tables_recovers_the_kaslr_slide(config):
    """Meltdown reads what the user tables map: the entry text gives away where the kernel sits."""
    from ptilab.mmu.meltdown import exposure

    unslid = real_kernel(nokaslr_sibling(config)).symbols
    k = real_kernel(config)
    found = views_from_image(k.mem, k.cpu()["cr3"], k.geometry)
    result = exposure(k.mem, found.user, unslid)
    assert result.kaslr_slide == k.symbols["_text"] - unslid["_text"]
    assert result.text_base == k.symbols["_text"]
    assert (result.kaslr_slide != 0) == k.meta["kaslr"]


@pytest.mark.parametrize("config", REAL_CONFIGS)
def test_real_kernels_walk_to_the_same_ranges_summarised_or_not(config):
    """The ESPfix area's aliases are summarised by the walker; expanded, the
    address space is record for record what walking every alias gives."""
    any_kernel = real_kernel(config)
    cpu = any_kernel.cpu()
    for cr3 in {cpu["cr3"] & ~0x1FFF, cpu["cr3"] & ~0xFFF}:
        w = walk(any_kernel.mem, cr3, any_kernel.geometry)
        full = walk(any_kernel.mem, cr3, any_kernel.geometry, _summarise=False)
        assert np.array_equal(w.ranges, full.ranges)
        assert [r.tolist() for r in w.table_refs] == [r.tolist() for r in full.table_refs]
        assert w.mapped_bytes() == full.mapped_bytes()
        assert len(w.distinct) < len(full.ranges) or not w.alias_count()


def test_auto_pti_without_pcid_clones_kernel_text_as_a_low_finding_and_passes():
    # 5-level, no pti= option, a CPU without PCID: pti_clone_kernel_text() runs.
    from ptilab.audit.findings import Severity as S

    k = real_kernel("pti-auto-5level")
    found = _machine_audit(k)
    (clone,) = [f for f in found if f.id == "PTI-KERNEL-IMAGE"]
    assert clone.severity is S.LOW and clone.spans[0].start == k.symbols["_text"]
    assert {f.id for f in found if f.severity >= S.MEDIUM} == set()  # no USER-VIEW-KERNEL-EXEC, -GLOBAL
