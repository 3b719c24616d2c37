"""The HTML report as text: its sections, its drawings, and that it needs no network."""

from __future__ import annotations

import base64
from html import escape
from html.parser import HTMLParser

import numpy as np
import pytest
from click.testing import CliRunner

from ptilab.audit.image import audit_image
from ptilab.cli import cli
from ptilab.report.html import audit_report, comparison_report, cut
from ptilab.report.svg import log_edges
from ptilab.paging import RANGE_DTYPE
from ptilab.paging import entry as e


class Elements(HTMLParser):
    """Every start tag with its attributes, and the text, of one page."""

    def __init__(self, page: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data):
        self.text.append(data)

    def ids(self) -> set[str]:
        return {a["id"] for _, a in self.tags if "id" in a}

    def with_class(self, word: str) -> list[tuple[str, dict[str, str]]]:
        return [(t, a) for t, a in self.tags if word in a.get("class", "").split()]


@pytest.fixture(scope="module")
def comparison() -> Elements:
    return Elements(comparison_report("linux-6.1", cpus=4, levels=4))


def test_comparison_has_a_row_and_a_section_per_design(comparison):
    designs = [a["data-design"] for _, a in comparison.with_class("design-row")]
    assert designs == ["explicit", "mirror", "shared-pmd", "linux"]
    assert {"comparison", "compare-table"} | {f"design-{d}" for d in designs} <= comparison.ids()
    for d in designs:
        assert {f"d-{d}-map", f"d-{d}-tree", f"d-{d}-tree-pgd-user", f"d-{d}-tree-pgd-kernel"} <= comparison.ids()


def test_comparison_embeds_the_cost_models_numbers_and_plot():
    from ptilab.mmu.cost import cost

    page = comparison_report("linux-4.15", cpus=2, levels=4)
    parsed = Elements(page)
    rows = [a["data-design"] for _, a in parsed.with_class("cost-row")]
    assert rows == ["explicit", "mirror", "shared-pmd", "linux", "off"]
    # The table shows what cost() measures for that design, not a canned value.
    mirror = {c.workload: c.cold for c in cost("linux-4.15", "mirror", 2, 4)}
    body = page[page.index('class="cost-row" data-design="mirror"'):]
    body = body[:body.index("</tr>")]
    for refill in mirror.values():
        assert f"<td>{refill.lines} ({refill.lines_both_views})" in body
    img = next(a for t, a in parsed.tags if t == "img" and a.get("id") == "cost-plot")
    png = base64.b64decode(img["src"].split(",", 1)[1])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_report_loads_nothing_from_the_network(comparison):
    for tag, attrs in comparison.tags:
        for name in ("src", "href", "xlink:href", "action", "data"):
            value = attrs.get(name, "")
            assert not value.startswith(("http", "//")), (tag, name, value)
            if name == "src" and value:
                assert value.startswith("data:"), (tag, value)
    assert not [t for t, _ in comparison.tags if t in ("link", "script", "iframe")], "no linked styles or scripts"


def test_linux_design_shares_the_area_tables_and_mirror_copies_them():
    # The seed's point: linux and shared-pmd point both PGDs at the same
    # lower tables of the cpu_entry_area; mirror gives the user PGD copies.
    for design, shared in (("linux", True), ("shared-pmd", True), ("mirror", False), ("explicit", False)):
        page = Elements(comparison_report("linux-6.1", cpus=2, levels=4, designs=[design]))
        boxes = [a for _, a in page.with_class("tree-box") if "pgd" not in a["class"].split()]
        area = [a for a in boxes if "cpu_entry_area" in a["data-reaches"].split("/")]
        assert all(a["data-views"] == "kernel user" for a in boxes if "shared" in a["class"].split())
        if shared:
            assert any("shared" in a["class"].split() for a in area), design
        else:
            assert not any("shared" in a["class"].split() for a in area), design
            assert any("user-only" in a["class"].split() for a in area), design
            assert any("kernel-only" in a["class"].split() for a in area), design


def test_map_colours_the_kernel_half_by_kind(comparison):
    kinds = {a["data-kind"] for _, a in comparison.with_class("map-seg") if a["data-view"] == "user"}
    assert {"idt", "gdt", "tss", "exception_stack", "entry text", "espfix", "cpu_tss_rw", "user space"} <= kinds
    assert "direct map" not in kinds, "the user view maps no direct map beyond the TSS pages"
    kernel = {a["data-kind"] for _, a in comparison.with_class("map-seg") if a["data-view"] == "kernel"}
    assert {"direct map", "kernel image"} <= kernel


def test_text_is_escaped():
    from ptilab.report.svg import TreeEdge, TreeNode, table_tree_svg

    svg = table_tree_svg([TreeNode("a", 0, "PGD", "<script>x</script>", {"user"})], [TreeEdge("a", "a", 1, {"user"})],
                         ["PGD"], "t")
    assert "<script>" not in svg and "&lt;script&gt;" in svg


def test_log_edges_give_the_first_page_its_own_bin():
    edges = log_edges(1 << 39, 160)
    assert edges[:2] == [0, 4096] and edges[-1] == 1 << 39
    assert all(b > a for a, b in zip(edges, edges[1:]))


def test_cut_splits_a_range_at_the_entry_text():
    r = np.zeros(1, RANGE_DTYPE)
    r["va"], r["size"], r["pa"], r["prot"] = 0xFFFF_FFFF_8100_0000, 16 << 20, 0x100_0000, e.P
    out = cut(r, np.array([0xFFFF_FFFF_81C0_0000, 0xFFFF_FFFF_81E0_0000], dtype=np.uint64))
    assert out["va"].tolist() == [0xFFFF_FFFF_8100_0000, 0xFFFF_FFFF_81C0_0000, 0xFFFF_FFFF_81E0_0000]
    assert int(out["size"].sum()) == 16 << 20
    assert out["pa"].tolist() == [0x100_0000, 0x1C0_0000, 0x1E0_0000]


def test_report_command_writes_a_comparison(tmp_path):
    out = tmp_path / "r.html"
    result = CliRunner().invoke(cli, ["report", str(out), "--kernel", "kaiser-2017", "--cpus", "2"])
    assert result.exit_code == 0, result.output
    page = Elements(out.read_text())
    assert "design-explicit" in page.ids()
    assert "kaiser-2017" in "".join(page.text)
    # The 2017 area lived in the fixmap: the tree still walks to it.
    assert any("cpu_entry_area" in a["data-reaches"].split("/") for _, a in page.with_class("tree-box"))


def test_report_command_rejects_model_options_with_an_image(tmp_path):
    from ptilab.errors import PtilabError

    result = CliRunner().invoke(cli, ["report", str(tmp_path / "r.html"), "--image", "x.core", "--cpus", "3"])
    assert isinstance(result.exception, PtilabError)
    assert "--cpus" in str(result.exception)


def test_audit_report_of_the_real_kernel_lists_findings_and_shares_slot_508():
    from tests.realkernel.conftest import real_kernel

    k = real_kernel("pti-4level")
    cpu = k.cpu()
    page = Elements(audit_report(audit_image(k.mem, "pti-4level", cpu["cr3"], k.geometry, k.symbols), k.mem))
    assert {"pair", "findings", "findings-table", "image-map", "image-tree", "image-tree-pgd-user",
            "image-tree-pgd-kernel"} <= page.ids()
    assert {a["data-id"] for _, a in page.with_class("finding")} >= {"PTI-USER-VIEW"}
    shared = [a for _, a in page.with_class("shared")]
    assert shared, "the cpu_entry_area and espfix tables are the kernel's own"
    # Slot 511 (kernel text) goes to user-only tables: entry text cloned, not shared.
    assert page.with_class("user-only") and page.with_class("kernel-only")


def test_audit_report_without_pti_draws_one_tree():
    from tests.realkernel.conftest import real_kernel

    k = real_kernel("pti-off")
    cpu = k.cpu()
    page = Elements(audit_report(audit_image(k.mem, "pti-off", cpu["cr3"], k.geometry, k.symbols), k.mem))
    assert "PTI-OFF" in {a["data-id"] for _, a in page.with_class("finding")}
    assert not page.with_class("shared") and page.with_class("one-tree")
    assert "image-tree-pgd-kernel" not in page.ids()


def test_audit_report_knows_the_machine_as_the_text_audit_does():
    """An AMD EPYC guest that left PTI off by design: the page says so and why, as `ptilab audit` prints it."""
    from ptilab.report.tables import audit_header
    from tests.realkernel.conftest import real_kernel

    k = real_kernel("epyc-auto-kaslr")
    result = audit_image(k.mem, "epyc", k.cpu()["cr3"], k.geometry, k.symbols)
    html = audit_report(result, k.mem)
    page = Elements(html)
    assert "machine" in page.ids()
    for line in audit_header(result):
        assert escape(line) in html
    assert any(line.startswith("CPU: AMD EPYC") and "not affected by Meltdown" in line for line in audit_header(result))
    severity = {a["data-id"]: a["class"] for _, a in page.with_class("finding")}
    assert "sev-info" in severity["PTI-OFF"] and "KASLR-KERNEL-MAPPED" in severity
