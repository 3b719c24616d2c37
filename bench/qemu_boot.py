"""Benchmark: `ptilab boot` from its start to the verdict, beside a bare QEMU
boot of the same kernel to the same point, in the same run.

The bare row is QEMU alone, started with the command line ptilab boot gives
it (ptilab.guest.qemu.command: the same kernel, initramfs, -cpu, -m, -smp,
command line) and timed from its start to the guest's @@PTILAB-READY line on
the console: every CPU in its user-mode loop, the moment ptilab starts
freezing. The ptilab row is the whole `ptilab boot --accel tcg --json` process,
interpreter start to exit: building the initramfs, QEMU's boot, the freeze in
user mode, QEMU's walk (info mem / info tlb), the 256 MiB core, the audit.
ptilab's share is the difference of the medians (rows alternated, --runs
times). Target (issue 20): at most 2 s. The KVM probe, which --accel auto pays
on a machine whose KVM cannot boot the guest, is timed as a row of its own.

    python bench/qemu_boot.py [--runs 3] [--vmlinuz PATH] [--auto]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from bench._timing import child_env, load_line  # noqa: E402
from ptilab.guest import qemu  # noqa: E402
from ptilab.guest.capture import INIT, READY, BootRequest  # noqa: E402
from ptilab.guest.image import GUEST_MODULES, kernel_image  # noqa: E402
from ptilab.guest.initramfs import initramfs  # noqa: E402
from ptilab.guest.modules import module_files, modules_with_dependencies  # noqa: E402

BUDGET = 2.0
DEFAULT = [p for p in sorted((ROOT / "tests/realkernel/out/.cache/kernels").glob("6.1.0-*/boot/vmlinuz-6.1.0-*"))
           if p.name.split("-")[-2].isdigit()]  # generic: neither -cloud- nor -rt-


def bare_boot(vmlinuz: Path, request: BootRequest) -> float:
    """Seconds from QEMU's start to READY on its console, QEMU started as ptilab boot starts it."""
    with tempfile.TemporaryDirectory(prefix="bench-boot-") as tmp:
        work = Path(tmp)
        image = kernel_image(vmlinuz, work / "deb")
        files = module_files("lib/fw_cfg", modules_with_dependencies(image.modules, list(GUEST_MODULES)))
        (work / "initramfs.cpio.gz").write_bytes(initramfs(INIT, files))
        machine = qemu.Machine(request.cpu_model(), request.memory, request.smp, "tcg")
        cmd = qemu.command(image.path, work / "initramfs.cpio.gz", request.command_line(), work, machine)
        started = time.perf_counter()
        run = qemu.start(cmd, work)
        try:
            while READY not in run.console_text():
                if run.qemu.poll() is not None or time.perf_counter() - started > request.timeout:
                    raise SystemExit(f"bare QEMU did not reach {READY}")
                time.sleep(0.05)
            return time.perf_counter() - started
        finally:
            qemu.reap(run, None)


def ptilab_boot(vmlinuz: Path, accel: str) -> tuple[float, dict]:
    """Wall seconds of one `ptilab boot` process, and its boot.json."""
    with tempfile.TemporaryDirectory(prefix="bench-ptilab-") as out:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "ptilab.cli", "boot", str(vmlinuz), "--out", out,
                               "--accel", accel, "--json"], env=child_env(), capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode not in (0, 1):
            raise SystemExit(f"ptilab boot failed: {done.stderr.strip()}")
        return wall, json.loads((Path(out) / "boot.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--vmlinuz", type=Path, default=DEFAULT[-1] if DEFAULT else None)
    parser.add_argument("--auto", action="store_true", help="also time --accel auto (the KVM probe)")
    args = parser.parse_args()
    if args.vmlinuz is None:
        raise SystemExit("no kernel: give --vmlinuz (or build the real-kernel fixtures)")
    request = BootRequest(accel="tcg")
    print(f"{args.vmlinuz.name}: {load_line()}")
    bare, ours, phases = [], [], []
    for i in range(args.runs):
        bare.append(bare_boot(args.vmlinuz, request))
        wall, meta = ptilab_boot(args.vmlinuz, "tcg")
        ours.append(wall)
        phases.append(meta["seconds"])
        print(f"run {i + 1}: bare QEMU to {READY} {bare[-1]:.2f} s; ptilab boot to verdict {wall:.2f} s "
              f"(QEMU to ready {meta['seconds']['ready']:.2f}, freeze {meta['seconds']['freeze']:.2f}, "
              f"walks {meta['seconds']['walks']:.2f}, core {meta['seconds']['core']:.2f})", flush=True)
    b, o = statistics.median(bare), statistics.median(ours)
    share = o - b
    print(f"median: bare QEMU {b:.2f} s, ptilab boot {o:.2f} s: ptilab's share {share:.2f} s "
          f"(budget {BUDGET:.1f} s: {'met' if share <= BUDGET else 'NOT met'})")
    if args.auto:
        wall, meta = ptilab_boot(args.vmlinuz, "auto")
        print(f"--accel auto: {wall:.2f} s, {meta['accel']} ({meta['accel_reason']}); "
              f"before the boot that counted: {meta['seconds']['probe']:.2f} s")


if __name__ == "__main__":
    main()
