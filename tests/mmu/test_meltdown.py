"""The Meltdown attacker model: what user mode reads through the user tables."""

from ptilab.linux.kernel import TEXT_START
from ptilab.pti import boot
from ptilab.mmu.meltdown import MODEL_SYMBOLS, kernel_exposure


def test_the_attacker_finds_the_idt_and_recovers_the_kernel_text_base_on_6_1():
    x = kernel_exposure(boot("linux-6.1", "linux", cpus=2))
    assert x.idt_page == 0xFFFF_FE00_0000_0000
    assert x.text_base == TEXT_START and x.kaslr_slide == 0
    assert x.leaks[0].value == MODEL_SYMBOLS["asm_exc_divide_error"]


def test_a_kaslr_slide_is_recovered_from_one_gate():
    x = kernel_exposure(boot("linux-6.1", "linux", cpus=2), slide=0x1E0_0000)
    assert x.kaslr_slide == 0x1E0_0000 and x.text_base == TEXT_START + 0x1E0_0000


def test_tss_and_gdt_give_away_each_cpus_entry_area():
    x = kernel_exposure(boot("linux-6.1", "linux", cpus=2))
    found = {lk.source: lk.value for lk in x.leaks}
    assert found["cpu 1 gdt[8] TSS descriptor base"] == 0xFFFF_FE00_0003_E000  # CPU 1's TSS
    assert found["cpu 1 tss.sp0"] == 0xFFFF_FE00_0003_E000  # entry stack top = TSS start
    assert found["cpu 0 tss.ist[1]"] == 0xFFFF_FE00_0000_E000  # top of CPU 0's NMI stack


def test_the_readable_set_is_supervisor_only_and_sums_up_the_espfix_aliases():
    x = kernel_exposure(boot("linux-6.1", "linux", cpus=2))
    regions = {r.region for r in x.readable}
    # Named as the audit names them: the per-CPU cpu_tss_rw pages are not "direct map".
    assert {r for r in regions if not r.startswith("cpu_entry_area ")} == {"cpu_tss_rw", "entry text", "espfix"}
    assert {"cpu_entry_area idt", "cpu_entry_area gdt", "cpu_entry_area tss"} <= regions
    assert [r.pages for r in x.readable if r.region == "cpu_tss_rw"] == [1, 1]
    espfix = [r for r in x.readable if r.region == "espfix"]
    assert len(espfix) == 1 and espfix[0].aliases == 65536


def test_each_piece_of_the_entry_area_is_one_row_per_cpu():
    x = kernel_exposure(boot("linux-6.1", "linux", cpus=2))
    rows = [r for r in x.readable if r.region.startswith("cpu_entry_area ")]
    # The area is cut into pages to be named; pages that follow one another with one name are one row.
    assert not [(a, b) for a, b in zip(rows, rows[1:]) if a.end == b.start and (a.region, a.writable) == (b.region, b.writable)]
    tss = [r for r in rows if r.region == "cpu_entry_area tss"]
    assert [(r.start, r.pages) for r in tss] == [(0xFFFF_FE00_0000_3000, 5), (0xFFFF_FE00_0003_E000, 5)]
    assert all(r.frames == r.pages for r in rows)


def test_without_the_idt_in_the_user_tables_there_is_no_text_base():
    x = kernel_exposure(boot("linux-6.1", "explicit", cpus=2))
    assert x.idt_page is None and x.text_base is None
    assert any("IDT page" in n for n in x.notes)


def test_an_unfilled_model_says_what_a_real_gdt_would_reveal():
    x = kernel_exposure(boot("linux-6.1", "linux", cpus=1), fill=False)
    assert x.text_base is None
    assert any("TSS descriptor" in n for n in x.notes)
