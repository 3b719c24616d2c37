"""ptilab's ptdump text of real Debian boots, held to what Linux's own ptdump prints there."""

from ptilab.formats.ptdump import format_walk, linux_markers
from ptilab.paging import walk
from tests.realkernel.conftest import real_kernel


def _user_text(config: str) -> str:
    k = real_kernel(config)
    return format_walk(walk(k.mem, k.cpu()["cr3"], k.geometry), linux_markers(k.geometry))


def test_a_four_level_boot_labels_its_top_level_pgd_and_never_p4d():
    levels = {line.split()[-1] for line in _user_text("pti-4level").splitlines() if line.startswith("0x")}
    assert levels == {"pgd", "pud", "pmd", "pte"}


def test_a_five_level_boot_has_pgd_and_p4d_lines():
    levels = {line.split()[-1] for line in _user_text("pti-5level").splitlines() if line.startswith("0x")}
    assert levels == {"pgd", "p4d", "pud", "pmd", "pte"}
