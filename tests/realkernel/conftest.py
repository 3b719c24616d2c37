"""Real-kernel fixtures: built by build.py (run by .ci/run); built here on demand.

Outside CI a machine that cannot build them (no root, no apt) skips these
tests with the reason; in CI (CI=true) that is a failure, never a silent skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from ptilab.formats.kallsyms import read_symbols
from ptilab.memory.images import open_image
from ptilab.paging import Geometry

from tests.realkernel.build import CONFIGS

OUT = Path(__file__).resolve().parent / "out"
# What the tests run over: the configurations build.py knows, whether or not
# they are built yet, so the first run collects the same tests as the next
# (a directory under out/ that build.py did not make is not a fixture).
REAL_CONFIGS = sorted(CONFIGS)


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


def _load(config: str) -> RealKernel:
    path = OUT / config
    if not (path / "meta.json").exists():
        with _uncaptured():
            # build.py's progress lines (stdout) go to the terminal: a boot takes a while.
            print(f"\nrealkernel: building fixture {config} (python tests/realkernel/build.py --config {config})",
                  flush=True)
            built = subprocess.run([sys.executable, str(Path(__file__).with_name("build.py")), "--config", config],
                                   stderr=subprocess.PIPE, text=True)
        if built.returncode:
            reason = f"real-kernel fixture {config} could not be built: {built.stderr.strip()[-300:]}"
            if os.environ.get("CI"):
                pytest.fail(reason)
            pytest.skip(reason)
    meta = json.loads((path / "meta.json").read_text())
    return RealKernel(config, path, meta, open_image(path / "core.elf"), read_symbols(path / "kallsyms.txt"))


PYTEST_CONFIG = None  # set by tests/conftest.py's pytest_configure


@contextmanager
def _uncaptured():
    """pytest's output capture suspended, so what the block prints reaches the terminal."""
    capman = PYTEST_CONFIG.pluginmanager.getplugin("capturemanager") if PYTEST_CONFIG else None
    if capman is None:
        yield
        return
    with capman.global_and_fixture_disabled():
        yield


_cache: dict[str, RealKernel] = {}


def real_kernel(config: str) -> RealKernel:
    if config not in _cache:
        _cache[config] = _load(config)
    return _cache[config]


@pytest.fixture(params=["pti-4level", "pti-5level", "pti-kaslr"])
def pti_kernel(request) -> RealKernel:
    return real_kernel(request.param)


@pytest.fixture(params=["pti-4level", "pti-5level", "pti-off", "pti-kaslr"])
def any_kernel(request) -> RealKernel:
    return real_kernel(request.param)
