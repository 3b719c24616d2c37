"""ptilab diff on Debian's boots: the same boot twice, PTI switched off and on,
6.1 against 6.12's random cpu_entry_area, PTI's auto mode on a CPU without PCID."""

import json
import subprocess
import sys

from ptilab.audit.sources import views_from_image, views_from_model
from ptilab.compare.viewdiff import Side, diff_views
from tests.realkernel.conftest import real_kernel


def side(config: str, image: str = "core.elf") -> Side:
    k = real_kernel(config)
    if image == "core.elf":
        mem, cr3 = k.mem, k.cpu()["cr3"]
    else:
        from ptilab.memory.images import open_image
        from ptilab.memory.vmcoreinfo import parse_vmcoreinfo
        mem = open_image(k.path / image)
        cr3 = parse_vmcoreinfo(mem.vmcoreinfo_text).kernel_pgd
    found = views_from_image(mem, cr3, k.geometry)
    return Side(f"{config}/{image}", k.geometry, found.views.user, found.views.user_copies)


def regions(changes) -> set[str]:
    return {c.region for c in changes}


def test_a_core_against_its_own_kdump_compressed_dump_differs_in_nothing():
    # The dump holds no CPU notes: its view is init_mm's pair, the core's a busybox task's;
    # both share the kernel half, which is all diff compares.
    d = diff_views(side("pti-kaslr"), side("pti-kaslr", "kdump-zlib.dump"))
    assert (d.exposed, d.moved, d.gone) == ([], [], [])


def test_pti_on_to_off_exposes_the_direct_map_and_the_kernel_text():
    d = diff_views(side("pti-4level"), side("pti-off"))
    assert d.exposes_more
    assert {"direct map", "kernel text", "kernel data", "modules"} <= regions(d.exposed)
    text = [c for c in d.exposed if c.region == "kernel text"]
    assert sum(c.pages for c in text) * 4096 >= 8 << 20 and all("x" in c.rights.split() for c in text)
    direct = sum(c.pages for c in d.exposed if c.region == "direct map" and c.kind == "new") * 4096
    assert direct >= 200 << 20  # the guest's 256 MiB, less the holes


def test_pti_off_to_on_exposes_nothing_and_the_direct_map_is_gone():
    d = diff_views(side("pti-off"), side("pti-4level"))
    assert not d.exposes_more
    assert {"direct map", "kernel text"} <= regions(d.gone)


def test_the_randomised_cpu_entry_area_of_6_12_is_a_move_not_an_exposure():
    d = diff_views(side("pti-kaslr"), side("6.12-pti-kaslr"))
    assert not d.exposes_more
    moved = {c.region: c for c in d.moved}
    pieces = [r for r in moved if r.startswith("cpu_entry_area ")]
    assert {"cpu_entry_area gdt", "cpu_entry_area tss", "cpu_entry_area entry_stack_page"} <= set(pieces)
    # Random slots rearrange the CPUs' areas: no one shift; KASLR slides the entry text by one.
    assert all(moved[p].shift is None for p in pieces)
    assert moved["entry text"].shift is not None and moved["entry text"].shift % (2 << 20) == 0


def test_a_kaslr_slide_alone_is_a_move():
    d = diff_views(side("pti-4level"), side("pti-kaslr"))
    assert not d.exposes_more and not d.gone
    from ptilab.memory.images import open_image
    from ptilab.memory.vmcoreinfo import parse_vmcoreinfo
    # The same boot's VMCOREINFO says the slide (KERNELOFFSET); pti-4level's is 0.
    slide = parse_vmcoreinfo(open_image(real_kernel("pti-kaslr").path / "kdump-zlib.dump").vmcoreinfo_text)
    moved = {c.region: c for c in d.moved}
    assert {"entry text", "cpu_tss_rw"} <= set(moved)
    assert moved["entry text"].shift == slide.kernel_offset != 0


def test_pti_on_to_auto_on_a_cpu_without_pcid_exposes_the_kernel_image_clone():
    # Both 5-level: pti-auto-5level is the only auto-mode boot, so its pti=on twin is pti-5level.
    d = diff_views(side("pti-5level"), side("pti-auto-5level"))
    assert d.exposes_more and regions(d.exposed) == {"kernel text clone"}
    assert all("RW" not in c.rights.split() for c in d.exposed)  # text and rodata only
    assert d.notes == []


def test_paging_depths_that_differ_are_said():
    d = diff_views(side("pti-4level"), side("pti-auto-5level"))
    assert regions(d.exposed) == {"kernel text clone"}
    assert "4-level" in d.notes[0] and "5-level" in d.notes[0]


def test_a_model_design_against_linux_on_a_real_boot():
    views, kernel = views_from_model("model:linux-6.1:linux:2")
    model = Side("model", views.geometry, views.user, views.user_copies, profile=kernel.profile)
    d = diff_views(model, side("pti-4level"))
    # Linux's own design models what 6.1 maps: two CPUs' cpu_entry_area at the same addresses.
    assert not d.exposes_more and not d.gone, (d.exposed, d.gone)
    assert not any(c.region.startswith("cpu_entry_area") for c in d.moved)
    explicit_views, _ = views_from_model("model:linux-6.1:explicit:2")
    explicit = Side("explicit", explicit_views.geometry, explicit_views.user, explicit_views.user_copies)
    d = diff_views(side("pti-4level"), explicit)
    assert ("widened", "cpu_entry_area tss") in {(c.kind, c.region) for c in d.exposed}


def ptilab(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ptilab.cli", *args], capture_output=True, text=True, timeout=300)


def test_the_command_gates_on_new_exposure():
    on, off = (str(real_kernel(c).path / "core.elf") for c in ("pti-4level", "pti-off"))
    worse = ptilab("diff", on, off, "--json")
    assert worse.returncode == 1, worse.stderr
    report = json.loads(worse.stdout)
    assert report["exposes_more"] and "direct map" in {c["region"] for c in report["exposed"]}
    better = ptilab("diff", off, on)
    assert better.returncode == 0, better.stderr
    assert "B exposes nothing that A does not" in better.stdout


def test_a_saved_ptdump_against_the_boot_it_came_from(tmp_path):
    core = str(real_kernel("pti-kaslr").path / "core.elf")
    saved = tmp_path / "release.ptdump"
    saved.write_text(ptilab("dump", core).stdout)
    done = ptilab("diff", str(saved), core)
    assert done.returncode == 0 and "B exposes nothing that A does not" in done.stdout, done.stdout + done.stderr
    assert "moved" not in done.stdout  # the espfix pages compared by their totals
