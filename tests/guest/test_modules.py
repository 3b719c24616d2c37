"""A kernel package's modules come with what they depend on, dependencies first, as modprobe loads them."""

from __future__ import annotations

from pathlib import Path

import pytest

from ptilab.guest.modules import modinfo, module_files, modules_with_dependencies

KERNELS = sorted((Path(__file__).resolve().parents[1] / "realkernel" / "out" / ".cache" / "kernels").glob("*"))


@pytest.mark.skipif(not KERNELS, reason="no Debian kernels unpacked (tests/realkernel/build.py)")
@pytest.mark.parametrize("root", KERNELS, ids=lambda p: p.name)
def test_each_module_comes_after_what_it_depends_on(root):
    trees = [root / d / "modules" / root.name for d in ("lib", "usr/lib")]
    modules = modules_with_dependencies(trees, ["virtio_blk", "qemu_fw_cfg", "9p"])
    names = [name for name, _ in modules]
    assert len(names) == len(set(names))
    for i, (name, data) in enumerate(modules):
        assert data[:4] == b"\x7fELF", name  # unpacked from .ko.xz where Debian compresses them
        for dep in filter(None, (modinfo(data, "depends") or "").split(",")):
            assert dep in names[:i] or not any(t.glob(f"kernel/**/{dep}.ko*") for t in trees), (name, dep)


def test_module_files_number_them_in_load_order():
    assert list(module_files("lib/x", [("b", b"1"), ("a", b"2")])) == ["lib/x/00-b.ko", "lib/x/01-a.ko"]
