"""Real-kernel fixtures: built by build.py (run by .ci/run); built here on demand.

The first test that needs a missing fixture builds every missing one (build.py
boots two at a time), its progress shown on the terminal.  Outside CI a machine
that cannot build them (no root, no apt) skips these tests with the reason; in
CI (CI=true) that is a failure, never a silent skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import contextlib
import difflib
from dataclasses import dataclass
from pathlib import Path

import pytest

from ptilab.formats.kallsyms import read_symbols
from ptilab.memory.images import open_image
from ptilab.paging import Geometry
from tests.realkernel.build import CONFIGS

OUT = Path(__file__).resolve().parent / "out"


@dataclass
class RealKernel:
    config: str
    path: Path
    meta: dict
    mem: object
    symbols: dict[str, int]

    @property
    def geometry(self) -> Geometry:
        return Geometry(5 if self.meta["la57"] else 4)

    def cpu(self, index: int | None = None) -> dict:
        return self.meta["cpus"][self.meta["user_cpu"] if index is None else index]

    def oracle_task(self) -> tuple[int, str, int]:
        """pid, comm and kernel-PGD physical address of the task the oracle dumped."""
        pid, comm, pgd = (self.path / "oracle_task.txt").read_text().split()
        return int(pid), comm, int(pgd, 16)


# What the tests run over: the configurations build.py knows, whether or not
# they are built yet, so the first run collects the same tests as the next
# (a directory under out/ that build.py did not make is not a fixture).
REAL_CONFIGS = sorted(CONFIGS)
PTI_CONFIGS = [c for c, spec in CONFIGS.items() if spec.pti]
PTI_ON_CONFIGS = [c for c, spec in CONFIGS.items() if "pti=on" in spec.append.split()]  # not auto mode
KASLR_CONFIGS = [c for c, spec in CONFIGS.items() if "nokaslr" not in spec.append.split()]
# The boots also saved as kdump, QEMU kdump-compressed and makedumpfile files; some with LiME too.
DUMP_CONFIGS = [c for c, spec in CONFIGS.items() if spec.dumps]
LIME_CONFIGS = [c for c, spec in CONFIGS.items() if spec.lime_dump]


def nokaslr_sibling(config: str) -> str:
    """The config booting the same kernel with PTI on and KASLR off: its kallsyms are the unslid ones."""
    spec = CONFIGS[config]
    return next(c for c, s in CONFIGS.items() if (s.release, s.flavour, s.pti) == (spec.release, spec.flavour, True)
                and "nokaslr" in s.append.split())


_build_errors: dict[str, str] = {}
PYTEST_CONFIG = None  # set by tests/conftest.py's pytest_configure


@contextlib.contextmanager
def _uncaptured():
    """pytest's output capture suspended, so what the block prints reaches the terminal."""
    capman = PYTEST_CONFIG.pluginmanager.getplugin("capturemanager") if PYTEST_CONFIG else None
    if capman is None:
        yield
        return
    with capman.global_and_fixture_disabled():
        yield


def _build_missing() -> None:
    """One build.py run for every config without a meta.json; why each failed, if it did."""
    missing = [c for c in CONFIGS if not (OUT / c / "meta.json").exists() and c not in _build_errors]
    if not missing:
        return
    cmd = [sys.executable, str(Path(__file__).with_name("build.py"))] + [a for c in missing for a in ("--config", c)]
    with _uncaptured():
        print(f"\nrealkernel: building missing fixtures {' '.join(missing)}", flush=True)
        built = subprocess.run(cmd, stdout=None, stderr=subprocess.PIPE, text=True)
        sys.stderr.write(built.stderr)
    for c in missing:
        if not (OUT / c / "meta.json").exists():
            lines = built.stderr.splitlines()
            said = [l for l in lines if f" {c}: " in l] or [l for l in lines if "error:" in l]
            _build_errors[c] = (said or [f"build.py exited {built.returncode}"])[-1][-300:]


def _load(config: str) -> RealKernel:
    path = OUT / config
    if not (path / "meta.json").exists():
        _build_missing()
    if not (path / "meta.json").exists():
        reason = f"real-kernel fixture {config} could not be built: {_build_errors.get(config, 'unknown')}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    meta = json.loads((path / "meta.json").read_text())
    return RealKernel(config, path, meta, open_image(path / "core.elf"), read_symbols(path / "kallsyms.txt"))


_cache: dict[str, RealKernel] = {}


def real_kernel(config: str) -> RealKernel:
    if config not in _cache:
        _cache[config] = _load(config)
    return _cache[config]


@pytest.fixture(params=["pti-4level", "pti-5level", "pti-kaslr"])
def pti_kernel(request) -> RealKernel:
    """Debian 6.1 generic with pti=on (the boots the linux-6.1 profile models)."""
    return real_kernel(request.param)


@pytest.fixture(params=["pti-4level", "pti-5level", "pti-off", "pti-kaslr"])
def any_kernel(request) -> RealKernel:
    """Debian 6.1 generic; the whole matrix is REAL_CONFIGS."""
    return real_kernel(request.param)


ACCESSED = 1 << 5  # _PAGE_ACCESSED: not printed, but ptdump starts a new line where it changes


def _range_lines(text: str) -> list[tuple[str, str, str]]:
    """(start, end, flags and level) of each line, markers as ("", "", line), and
    neighbouring ranges that print the same flags and level joined."""
    out: list[tuple[str, str, str]] = []
    for line in text.splitlines():
        if not line.startswith("0x"):
            out.append(("", "", line))
            continue
        start, end = line[:37].split("-")
        rest = line[37:].split(None, 1)[1]
        if out and out[-1][0] and out[-1][1] == start and out[-1][2] == rest:
            out[-1] = (out[-1][0], end, rest)
        else:
            out.append((start, end, rest))
    return out


def _starts(text: str) -> set[int]:
    return {int(line[:18], 16) for line in text.splitlines() if line.startswith("0x")}


def assert_same_but_accessed_bits(got: str, want: str, view) -> None:
    """ptdump texts that may differ only where the Accessed bit changed: the same
    once neighbouring lines printing the same flags are joined, and at each line
    start only one text has, the frozen tables (view, a Walk) differ in that bit alone."""
    assert _range_lines(got) == _range_lines(want), "".join(difflib.unified_diff(
        want.splitlines(True), got.splitlines(True), "linux", "ptilab"))
    for va in _starts(got) ^ _starts(want):
        before, after = view.ranges_within(va - 1, va + 1)["prot"]
        assert int(before ^ after) & ~ACCESSED == 0, f"at {va:#x} more than the Accessed bit differs"


def raw_image(k: RealKernel, path: Path) -> Path:
    """The core's physical memory as a raw image: no notes, only the bytes (sparse where the core has no RAM)."""
    with open(path, "wb") as f:
        for start, end in k.mem.segments:
            for at in range(start, end, 16 << 20):
                f.seek(at)
                f.write(k.mem.read(at, min(16 << 20, end - at)))
    return path
