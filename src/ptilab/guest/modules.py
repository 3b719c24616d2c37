"""A kernel package's modules for the guest, with what each needs, in load order."""

from __future__ import annotations

import lzma
from pathlib import Path


def modinfo(data: bytes, key: str) -> str | None:
    """A `key=value` string of a module's .modinfo section, or None."""
    at = data.find(key.encode() + b"=")
    return None if at < 0 else data[at + len(key) + 1:data.index(b"\0", at)].decode()


def modules_with_dependencies(trees: list[Path], names: list[str]) -> list[tuple[str, bytes]]:
    """The named modules under trees (lib/modules/<release> directories) and those
    they need (each one's .modinfo depends=, as modprobe reads modules.dep),
    dependencies first, as (name, plain .ko bytes): xz-compressed from 6.12 on,
    and busybox's insmod wants them plain. A name no tree has is built in
    (7.2 builds virtio in) and skipped."""
    order: dict[str, bytes] = {}

    def add(name: str) -> None:
        if name in order:
            return
        found = sorted(m for tree in trees for stem in {name, name.replace("_", "-")}
                       for m in tree.glob(f"kernel/**/{stem}.ko*"))
        if not found:
            return
        data = found[0].read_bytes()
        data = lzma.decompress(data) if found[0].suffix == ".xz" else data
        order[name] = b""  # placed after its dependencies, and never visited twice
        for dep in filter(None, (modinfo(data, "depends") or "").split(",")):
            add(dep)
        del order[name]
        order[name] = data

    for name in names:
        add(name)
    return list(order.items())


def module_files(directory: str, modules: list[tuple[str, bytes]]) -> dict[str, bytes]:
    """The modules as directory/NN-name.ko in load order, for the init's
    `for m in DIR/*.ko; do insmod $m; done`."""
    return {f"{directory}/{i:02d}-{name}.ko": data for i, (name, data) in enumerate(modules)}
