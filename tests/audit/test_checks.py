import numpy as np
import pytest

from ptilab.audit import Severity, Views, audit
from ptilab.linux.exposure import Evidence, Exposure, Meltdown
from ptilab.pti import boot
from ptilab.paging import entry as e
from ptilab.paging import walk
from ptilab.paging.install import map_page


# The model's kernel image sits at its link-time address: KASLR off, as a nokaslr boot.
MODEL = Exposure(kaslr=False, kaslr_evidence=(Evidence("the model", "kernel image at its link-time address"),))
AFFECTED = Exposure(Meltdown.AFFECTED, (Evidence("the kernel log", "Kernel/User page tables isolation: "
                                                                   "disabled on command line."),))
AMD = Exposure(Meltdown.NOT_AFFECTED, (Evidence("the kernel log", "smpboot: CPU0: AMD EPYC Processor"),),
               cpu="AMD EPYC Processor")
XEN = Exposure(Meltdown.XEN_PV, (Evidence("vulnerabilities/meltdown", "Unknown (XEN PV detected, hypervisor "
                                                                      "mitigation required)"),))
KASLR = Exposure(kaslr=True, kaslr_evidence=(Evidence("VMCOREINFO", "KERNELOFFSET=2a000000"),))


def _views(k, exposure=MODEL):
    u = walk(k.ram, k.user_cr3(), k.geometry)
    kv = walk(k.ram, k.kernel_cr3(), k.geometry)
    return Views(k.geometry, u.ranges, kv.ranges, k.ram.read_frame(k.kernel_cr3().pgd >> 12).copy(),
                 anomalies=u.anomalies + kv.anomalies, exposure=exposure)


def _ids(findings, at_least=Severity.INFO):
    return {f.id for f in findings if f.severity >= at_least}


@pytest.fixture
def kernel():
    return boot("linux-6.1", "linux", cpus=4)


@pytest.mark.parametrize("design", ["linux", "shared-pmd", "mirror", "explicit"])
def test_modelled_pti_kernels_pass(design):
    findings = audit(_views(boot("linux-6.1", design, cpus=4)))
    assert _ids(findings, Severity.MEDIUM) == set()
    assert "PTI-CEA-FIXED" in _ids(findings)


def test_user_view_summary_names_every_allowed_piece(kernel):
    (summary,) = [f for f in audit(_views(kernel)) if f.id == "PTI-USER-VIEW"]
    for words in ("cpu_entry_area", "gdt", "tss", "estacks.NMI_stack", "entry text", "espfix",
                  "aliased 65536 times", "4 per-CPU cpu_tss_rw"):
        assert words in summary.explanation


@pytest.mark.parametrize("exposure, severity, words", [
    (AFFECTED, Severity.CRITICAL, "affected by Meltdown (the kernel log: 'Kernel/User page tables isolation: "
                                  "disabled on command line.')"),
    (Exposure(), Severity.HIGH, "nothing tells whether the CPU is affected"),
    (AMD, Severity.INFO, "by design: the CPU is not affected"),
    (XEN, Severity.LOW, "left to the hypervisor"),
])
def test_pti_off_is_as_severe_as_the_cpu_is_exposed(kernel, exposure, severity, words):
    kv = walk(kernel.ram, kernel.kernel_cr3(), kernel.geometry)
    findings = audit(Views(kernel.geometry, kv.ranges, kv.ranges, exposure=exposure))
    (off,) = [f for f in findings if f.id == "PTI-OFF"]
    assert off.severity is severity
    assert words in off.title + " " + off.explanation
    for evidence in exposure.meltdown_evidence:
        assert evidence.says in off.explanation  # the verdict names what it rests on


@pytest.mark.parametrize("exposure", [AFFECTED, AMD, Exposure()])
def test_the_whole_kernel_mapped_breaks_kaslr_on_any_cpu(kernel, exposure):
    kv = walk(kernel.ram, kernel.kernel_cr3(), kernel.geometry)
    x = Exposure(exposure.meltdown, exposure.meltdown_evidence, kaslr=True, kaslr_evidence=KASLR.kaslr_evidence)
    findings = audit(Views(kernel.geometry, kv.ranges, kv.ranges, exposure=x))
    (leak,) = [f for f in findings if f.id == "KASLR-KERNEL-MAPPED"]
    assert leak.severity is Severity.MEDIUM and "KERNELOFFSET=2a000000" in leak.explanation
    assert "CVE-2021-26318" in leak.explanation  # AMD's prefetch attack: not only Intel
    assert "KASLR-ENTRYBLEED" not in _ids(findings)


def test_pti_with_kaslr_still_leaks_the_base_through_the_entry_text(kernel):
    findings = audit(_views(kernel, KASLR))
    (bleed,) = [f for f in findings if f.id == "KASLR-ENTRYBLEED"]
    assert bleed.severity is Severity.MEDIUM
    assert "CVE-2022-4543" in bleed.explanation and "bf904d2762ee" in bleed.explanation
    assert bleed.spans and all(s.label == "entry text" for s in bleed.spans)
    assert "KASLR-KERNEL-MAPPED" not in _ids(findings) and "KASLR-OFF" not in _ids(findings)


def test_kaslr_unknown_is_said_and_kaslr_off_is_no_leak(kernel):
    (bleed,) = [f for f in audit(_views(kernel, Exposure())) if f.id == "KASLR-ENTRYBLEED"]
    assert "nothing tells whether KASLR is on" in bleed.explanation
    found = audit(_views(kernel, MODEL))
    assert "KASLR-ENTRYBLEED" not in _ids(found) and "KASLR-OFF" in _ids(found)


def test_a_kernel_page_in_the_user_tables_is_a_leak(kernel):
    secret = kernel.direct_map_va(0x5000_0000)
    map_page(kernel.ram, kernel.geometry, kernel.user_cr3().pgd, secret, 0x5000_0000, e.PAGE_KERNEL_RO & ~e.G,
             kernel.table_allocator("test", "leak"), 21)
    (leak,) = [f for f in audit(_views(kernel)) if f.id == "PTI-LEAK"]
    assert leak.severity is Severity.HIGH
    assert leak.spans[0].start == secret and leak.spans[0].end == secret + (1 << 21)


def test_writable_executable_kernel_memory_is_flagged(kernel):
    va = 0xFFFF_FFFF_8200_0000
    slot = kernel.kernel_entry(va, kernel.geometry.levels - 2)
    kernel.ram.write_entry(slot, (kernel.ram.read_entry(slot) | e.RW) & ~e.NX)
    assert "WX-KERNEL" in _ids(audit(_views(kernel)), Severity.HIGH)


def test_kernel_pgd_user_entries_without_nx_are_flagged(kernel):
    pgd = kernel.kernel_cr3().pgd
    kernel.ram.write_entry(pgd, kernel.ram.read_entry(pgd) & ~e.NX)
    (f,) = [f for f in audit(_views(kernel)) if f.id == "KERNEL-PGD-USER-EXEC"]
    assert "slots 0" in f.explanation


def test_user_bit_on_a_kernel_page_is_critical(kernel):
    slot = kernel.kernel_entry(0xFFFF_FFFF_8200_0000, kernel.geometry.levels - 2)
    kernel.ram.write_entry(slot, kernel.ram.read_entry(slot) | e.US)
    # US must be set at every level to count: set it on the upper tables too.
    table = kernel.kernel_cr3().pgd
    for depth in range(kernel.geometry.levels - 2):
        entry_pa = table + 8 * kernel.geometry.index(0xFFFF_FFFF_8200_0000, depth)
        value = kernel.ram.read_entry(entry_pa)
        kernel.ram.write_entry(entry_pa, value | e.US)
        table = e.frame_address(value)
    assert "KERNEL-USER-BIT" in _ids(audit(_views(kernel)), Severity.CRITICAL)


def _same_findings(summarised, expanded) -> bool:
    """Equal but for the spans, where a summarised range says how many times
    it appears instead of being listed that many times."""
    def key(findings, copies):
        return [(f.id, f.severity, f.title, f.explanation,
                 {(s.start, s.end, s.rights) for s in f.spans if copies or "mapped" not in s.label}) for f in findings]
    plain = [(f.id, f.severity, f.title, f.explanation, {(s.start, s.end, s.rights) for s in f.spans})
             for f in expanded]
    return all(a[:4] == b[:4] and a[4] <= b[4] for a, b in zip(key(summarised, False), plain)) \
        and len(summarised) == len(expanded)


def _expanded(found) -> Views:
    """The same views with every alias expanded: what the audit read before it summarised."""
    v = found.views
    return Views(v.geometry, found.user.ranges, found.kernel.ranges if found.kernel else None, v.kernel_pgd,
                 anomalies=v.anomalies, symbols=v.symbols)


@pytest.mark.parametrize("profile, design, cpus, levels", [
    ("kaiser-2017", "explicit", 5, 4), ("linux-4.15", "mirror", 64, 5), ("linux-6.1", "shared-pmd", 64, 4),
    ("linux-6.1", "linux", 300, 5)])
def test_the_summarised_audit_finds_what_the_expanded_one_does(profile, design, cpus, levels):
    from ptilab.audit.sources import views_from_image

    k = boot(profile, design, cpus, levels)
    found = views_from_image(k.ram, k.user_cr3().pgd, k.geometry)
    assert _same_findings(audit(found.views), audit(_expanded(found)))


def test_aliased_leaks_are_counted_once_per_copy(kernel):
    """A leaked page behind a PMD table that 8 PUD entries share: eight ranges, not one."""
    from ptilab.audit.sources import views_from_image

    secret = kernel.direct_map_va(0x5000_0000)
    pgd = kernel.user_cr3().pgd
    map_page(kernel.ram, kernel.geometry, pgd, secret, 0x5000_0000, e.PAGE_KERNEL_RO & ~e.G,
             kernel.table_allocator("test", "leak"), 12)
    pud = kernel.ram.read_entry(pgd + 8 * ((secret >> 39) & 511)) & e.ADDRESS_MASK
    slot = (secret >> 30) & 511
    pmd_entry = kernel.ram.read_entry(pud + 8 * slot)
    for i in range(1, 8):
        kernel.ram.write_entry(pud + 8 * ((slot + i) % 512), pmd_entry)
    found = views_from_image(kernel.ram, pgd, kernel.geometry)
    assert found.user.alias_count() >= 7
    (leak,) = [f for f in audit(found.views) if f.id == "PTI-LEAK"]
    assert leak.explanation.startswith("8 kernel range(s), 32 KiB")
    assert [s.label for s in leak.spans] == ["not allowed under PTI, mapped 8 times"]
    assert _same_findings(audit(found.views), audit(_expanded(found)))


def test_an_audit_of_8192_cpus_never_expands_the_espfix_aliases():
    from ptilab.audit.sources import views_from_image

    k = boot("linux-6.1", "linux", 8192, 5)
    found = views_from_image(k.ram, k.user_cr3().pgd, k.geometry)
    (summary,) = [f for f in audit(found.views) if f.id == "PTI-USER-VIEW"]
    # espfix_64.c: 64 stacks per page, so 128 pages for 8192 CPUs, each mapped 65536 times.
    assert "the espfix stacks (128 page(s) aliased 8388608 times" in summary.explanation
    assert found.user._ranges is None and found.kernel._ranges is None


def test_a_table_shared_between_the_halves_is_judged_where_its_copies_are():
    """All 512 PGD slots share one tree mapping a kernel-only page: the
    copies in the kernel half are PTI off, although the walked source of
    every alias lies in the user half."""
    from ptilab.audit.sources import views_from_image
    from ptilab.memory.simulated import SimulatedRAM
    from ptilab.paging import FOUR_LEVEL

    ram = SimulatedRAM(8 << 12)
    for table, below in ((1, 2), (2, 3), (3, 4)):
        ram.write_entries(table << 12, np.full(512, (below << 12) | e.P | e.RW | e.US, dtype=np.uint64))
    ram.write_entries(4 << 12, np.full(512, (5 << 12) | e.P | e.RW, dtype=np.uint64))
    found = views_from_image(ram, 0x1000, FOUR_LEVEL)
    ids = _ids(audit(found.views), Severity.HIGH)
    assert "PTI-OFF" in ids and "WX-USER" in ids  # all kernel text is there: PTI-OFF, not a finding per range



@pytest.mark.parametrize("design", ["linux", "shared-pmd", "mirror", "explicit"])
@pytest.mark.parametrize("profile", ["kaiser-2017", "linux-4.15", "linux-6.1"])
def test_every_modelled_user_view_maps_a_way_into_the_kernel(profile, design):
    assert "TABLES-NO-ENTRY" not in _ids(audit(_views(boot(profile, design, cpus=2))))


def test_tables_that_map_no_kernel_code_are_not_clean(kernel):
    """An empty tree (a zeroed frame taken for a PGD) is no CPU's: never a clean audit."""
    from ptilab.paging import EFF_NX, RANGE_DTYPE

    empty = np.zeros(0, RANGE_DTYPE)
    findings = audit(Views(kernel.geometry, empty))
    assert findings[0].id == "TABLES-NO-ENTRY" and findings[0].severity is Severity.HIGH
    # The user view without its executable ranges (the entry text): the
    # cpu_entry_area is there, but nothing to run on entry.
    u = walk(kernel.ram, kernel.user_cr3(), kernel.geometry).ranges
    data_only = u[(u["eff"] & np.uint64(EFF_NX)) != 0]
    assert "TABLES-NO-ENTRY" in _ids(audit(Views(kernel.geometry, data_only)))


# pti_clone_kernel_text() clones [_text, __end_rodata_aligned) read-only; the symbols of a 6.1 image.
CLONE_SYMBOLS = {"_text": 0xFFFF_FFFF_8100_0000, "__entry_text_start": 0xFFFF_FFFF_81C0_0010,
                 "__entry_text_end": 0xFFFF_FFFF_81C0_2000, "_etext": 0xFFFF_FFFF_81E0_1D32,
                 "__end_rodata_aligned": 0xFFFF_FFFF_82A0_0000}


@pytest.mark.parametrize("where, flags, expect", [
    (0xFFFF_FFFF_8100_0000, (e.PAGE_KERNEL_LARGE & ~e.RW & ~e.NX), "clone"),   # text, read-only, executable
    (0xFFFF_FFFF_8220_0000, e.PAGE_KERNEL_LARGE & ~e.RW, "clone"),        # rodata
    (0xFFFF_FFFF_8100_0000, e.PAGE_KERNEL_LARGE & ~e.NX, "leak"),            # writable text is no clone
    (0xFFFF_FFFF_82A0_0000, e.PAGE_KERNEL_LARGE & ~e.RW, "leak"),         # past rodata: data, secrets
])
def test_the_kernel_text_clone_is_low_and_anything_else_of_the_image_a_leak(kernel, where, flags, expect):
    map_page(kernel.ram, kernel.geometry, kernel.user_cr3().pgd, where, 0x100_0000, flags,
             kernel.table_allocator("test", "clone"), 21)
    views = _views(kernel)
    views.symbols = CLONE_SYMBOLS
    found = audit(views)
    if expect == "clone":
        (clone,) = [f for f in found if f.id == "PTI-KERNEL-IMAGE"]
        assert clone.severity is Severity.LOW and "KASLR is gone" in clone.explanation
        assert _ids(found, Severity.MEDIUM) == set()
    else:
        assert "PTI-KERNEL-IMAGE" not in _ids(found)
        assert "PTI-LEAK" in _ids(found, Severity.HIGH)
