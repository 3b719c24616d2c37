"""Packages import downward only: a package may use its own modules and
those of lower layers, never a higher one (type-only imports under
TYPE_CHECKING excepted), so each layer can be read and tested without the
ones above it."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ptilab"
LAYERS = (
    ("errors", "progress"),  # the library's error types and progress hook
    ("files",),  # opening the user's files
    ("paging", "terminal", "guest"),  # SDM truth, no Linux in it; the console the CLI writes to; QEMU guests
    ("memory",),  # frames of physical memory, allocators
    ("linux",),  # the modelled kernel and its layouts; calls PTI designs through PtiHooks
    ("pti", "formats"),  # the designs; ptdump / QEMU / kallsyms text in and out
    ("audit", "compare", "mmu"),  # analyses
    ("report", "scan"),  # reports; scanning images for every address space
    ("cli",),
)
RANK = {pkg: rank for rank, names in enumerate(LAYERS) for pkg in names}


def runtime_imports(path: Path) -> list[tuple[int, str]]:
    """(line, ptilab package) of every import outside `if TYPE_CHECKING:` blocks, function-level ones included."""
    tree = ast.parse(path.read_text())
    type_only = {id(node) for block in ast.walk(tree)
                 if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                 for node in ast.walk(block)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or id(node) in type_only or not node.module:
            continue
        parts = node.module.split(".")
        if parts[0] != "ptilab":
            continue
        found += [(node.lineno, parts[1])] if len(parts) > 1 else [(node.lineno, a.name) for a in node.names]
    return found


def package_of(path: Path) -> str:
    return path.relative_to(SRC).parts[0].removesuffix(".py")


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_a_module_imports_only_its_own_package_and_lower_layers(path):
    pkg = package_of(path)
    if pkg == "__init__":
        return
    assert pkg in RANK, f"{pkg} is in no layer: place it in LAYERS"
    upward = [f"line {line}: ptilab.{target}" for line, target in runtime_imports(path)
              if target != pkg and RANK.get(target, 0) >= RANK[pkg]]
    assert not upward, f"{path.relative_to(SRC)} imports a package at or above its layer: {upward}"


def test_the_check_sees_an_upward_import(tmp_path):
    module = tmp_path / "kernel.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ptilab.pti import Design\n"
                      "def boot():\n    from ptilab.pti import get_design\n")
    assert runtime_imports(module) == [(5, "pti")]
