"""`ptilab boot`: a kernel booted under QEMU, frozen with a CPU in user mode,
and what an audit needs of it written to a directory:

  core.elf              dump-guest-memory, no paging (PT_LOADs: guest-physical ranges, QEMU's CPU notes
                        with each CR3; VMCOREINFO when the kernel's qemu_fw_cfg module loaded)
  cpu<N>.registers.txt  HMP `info registers` of CPU N at the freeze
  cpu<N>.info_mem.txt   HMP `info mem`: QEMU's own walk of CPU N's CR3 (4-level guests only)
  cpu<N>.info_tlb.txt   HMP `info tlb`: the same walk page by page
  console.txt           the serial console, from the first line
  boot.json             the kernel, the QEMU command, the accelerator and why, each CPU's CR3/CPL/RIP, timings

KVM when it works, TCG otherwise. "Works" is a probe, not a look at /dev/kvm:
under broken nested virtualisation QEMU starts with -accel kvm and the guest
never leaves the boot loader, so KVM gets KVM_PROBE seconds to bring the
kernel to its first console line, and is dropped for TCG when it does not.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ptilab import progress
from ptilab.guest import GuestError, qemu
from ptilab.guest.image import KernelImage, GUEST_MODULES
from ptilab.guest.initramfs import initramfs
from ptilab.guest.modules import module_files, modules_with_dependencies

KVM_PROBE = 5.0   # s from QEMU's start to the kernel's first console line under KVM (it takes ~1 s)
READY = "@@PTILAB-READY"
BOOTED = "@@PTILAB-BOOTED"
# A line only the kernel proper prints: the banner (linux_banner), any printk with its time
# stamp, or the init's first marker (a kernel booted with quiet prints neither before it).
KERNEL_LINE = re.compile(r"^(\[\s*\d+\.\d+\] |Linux version |@@PTILAB-)", re.M)
ACCELS = ("auto", "kvm", "tcg")

# One pinned busy loop per CPU keeps every CPU in user mode most of the time,
# so the host's stop lands on CPL 3 within a few rounds (tests/realkernel/build.py
# starts them too).
BUSY_LOOPS = r"""n=$(nproc)
i=0
while [ $i -lt $n ]; do
  taskset -c $i sh -c 'while :; do :; done' &
  i=$((i + 1))
done
"""
# PID 1 in the guest.
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in /lib/fw_cfg/*.ko; do insmod $m 2>/dev/null; done  # hands the kernel's VMCOREINFO to QEMU's vmcoreinfo device
exec </dev/console >/dev/console 2>&1
echo "@@PTILAB-BOOTED $(uname -r) uptime $(cut -d' ' -f1 /proc/uptime)"
echo "@@PTILAB-MELTDOWN $(cat /sys/devices/system/cpu/vulnerabilities/meltdown 2>/dev/null)"
""" + BUSY_LOOPS + r"""echo "@@PTILAB-READY $n busy loops, uptime $(cut -d' ' -f1 /proc/uptime)"
while :; do wait; done
"""


@dataclass(frozen=True)
class BootRequest:
    """How to boot: QEMU's machine, the kernel command line's own part, the deadline."""
    cpu: str = "qemu64,vendor=GenuineIntel"   # an Intel CPU without ARCH_CAPABILITIES: Meltdown-affected, PTI on
    memory: str = "256M"
    smp: int = 2
    accel: str = "auto"
    append: str = ""
    la57: bool = False
    kaslr: bool = True
    timeout: float = 300.0

    def command_line(self) -> str:
        """console=ttyS0 for the log, panic=-1 so a panic ends QEMU (-no-reboot) at once."""
        return " ".join(["console=ttyS0 panic=-1", *([] if self.kaslr else ["nokaslr"]), self.append]).strip()

    def cpu_model(self) -> str:
        return self.cpu + (",+la57" if self.la57 and "la57" not in self.cpu else "")


@dataclass
class Capture:
    """What one `ptilab boot` captured, and where."""
    out: Path
    kernel: str
    release: str
    accel: str
    accel_reason: str
    append: str
    cpu_model: str
    qemu_version: str
    command: list[str]
    cpus: list[dict]
    user_cpu: int
    meltdown: str
    seconds: dict = field(default_factory=dict)

    @property
    def core(self) -> Path:
        return self.out / "core.elf"

    def as_dict(self) -> dict:
        return {**asdict(self), "out": str(self.out), "core": str(self.core)}


def accel_plan(accel: str) -> list[tuple[str, str]]:
    """The accelerators to try in turn, each with why."""
    if accel == "tcg":
        return [("tcg", "--accel tcg")]
    usable = os.access("/dev/kvm", os.R_OK | os.W_OK)
    if accel == "kvm":
        if not usable:
            raise GuestError("--accel kvm: /dev/kvm is missing or not usable by this user")
        return [("kvm", "--accel kvm")]
    if not usable:
        return [("tcg", "no usable /dev/kvm")]
    return [("kvm", "KVM brought the kernel to its first console line"), ("tcg", "")]


def first_kernel_line(run: qemu.Run, by: float) -> bool:
    """The kernel printed its first console line before `by` (QEMU still running or not)."""
    while time.time() < by:
        if KERNEL_LINE.search(run.console_text()):
            return True
        if run.qemu.poll() is not None:
            return bool(KERNEL_LINE.search(run.console_text()))
        time.sleep(0.05)
    return bool(KERNEL_LINE.search(run.console_text()))


def capture(image: KernelImage, out: Path, request: BootRequest, work: Path) -> Capture:
    """Boot image under QEMU, stop it with a CPU at CPL 3 and write the core, the walks,
    the console and boot.json to out; GuestError with one line when the guest does not
    get there (the console's last line named)."""
    started = time.time()
    deadline = started + request.timeout
    files = module_files("lib/fw_cfg", modules_with_dependencies(image.modules, list(GUEST_MODULES)))
    initrd = work / "initramfs.cpio.gz"
    initrd.write_bytes(initramfs(INIT, files))
    out.mkdir(parents=True, exist_ok=True)
    fell_back = ""
    try:
        for accel, why in accel_plan(request.accel):
            machine = qemu.Machine(request.cpu_model(), request.memory, request.smp, accel)
            cmd = qemu.command(image.path, initrd, request.command_line(), work, machine)
            (work / "console.log").unlink(missing_ok=True)
            what = f"booting {image.release or image.path.name} under {accel.upper()}"
            progress.step(what, 0, None)
            launched = time.time()
            with qemu.running(cmd, work, deadline) as (run, qmp):
                if accel == "kvm" and not first_kernel_line(run, min(deadline, time.time() + KVM_PROBE)):
                    said = (f"KVM did not get the kernel to its first console line in {KVM_PROBE:.0f} s"
                            + (f" ({qemu.last_line(run.errors.read_text(errors='replace'))})"
                               if run.qemu.poll() is not None else ""))
                    progress.step(what, 1, 1)
                    if request.accel == "kvm":
                        raise GuestError(f"{said}; try --accel tcg")
                    fell_back = said
                    continue
                text = qemu.wait_for(run, READY, deadline, request.timeout)
                ready = time.time()
                progress.step(what, 1, 1)
                result = _freeze_and_save(run, qmp, request, out, deadline)
                result.update(accel=accel, accel_reason=why or fell_back, command=cmd,
                              meltdown=_marker(text, "@@PTILAB-MELTDOWN"))
                result["seconds"].update(probe=round(launched - started, 2), ready=round(ready - launched, 2))
            break
    finally:
        console = work / "console.log"
        if console.exists():
            (out / "console.txt").write_text(console.read_text(errors="replace"))
    result["seconds"]["total"] = round(time.time() - started, 2)
    done = Capture(out, image.source or str(image.path), image.release, append=request.command_line(),
                   cpu_model=request.cpu_model(), **result)
    (out / "boot.json").write_text(json.dumps(done.as_dict(), indent=2) + "\n")
    return done


def _marker(text: str, marker: str) -> str:
    m = re.search(rf"^{re.escape(marker)} ?(.*)$", text, re.M)
    return m.group(1).strip() if m else ""


def _freeze_and_save(run: qemu.Run, qmp: qemu.Qmp, request: BootRequest, out: Path, deadline: float) -> dict:
    """Stop in user mode, then the registers, QEMU's walks and the core; QEMU quits."""
    qmp.deadline = deadline
    t0 = time.time()
    with _phase("catching a CPU in user mode"):
        regs, rounds = qemu.stop_in_user_mode(qmp, request.smp)
    cpus = qemu.cpu_state(regs)
    t1 = time.time()
    with _phase("QEMU's walk of each CPU's tables (info mem, info tlb)"):
        for i, text_regs in enumerate(regs):
            (out / f"cpu{i}.registers.txt").write_text(text_regs)
            mem, tlb, _, _ = qemu.walks(qmp, i, la57=bool(cpus[i]["cr4"] & 1 << 12))  # CR4.LA57
            (out / f"cpu{i}.info_mem.txt").unlink(missing_ok=True)
            if mem is not None:
                (out / f"cpu{i}.info_mem.txt").write_text(mem)
            (out / f"cpu{i}.info_tlb.txt").write_text(tlb)
    t2 = time.time()
    with _phase("writing the ELF core (dump-guest-memory)"):
        try:
            qemu.dump_core(qmp, out / "core.elf")
        except BaseException:
            (out / "core.elf").unlink(missing_ok=True)
            raise
    t3 = time.time()
    version = qemu.qemu_version(qmp)
    try:
        qemu.quit_qemu(run.qemu, qmp, max(1.0, deadline - time.time()))
    except Exception:
        pass  # reaped (killed) on the way out of qemu.running()
    return {"qemu_version": version, "cpus": cpus, "user_cpu": next(c["index"] for c in cpus if c["cpl"] == 3),
            "seconds": {"stop_rounds": rounds, "freeze": round(t1 - t0, 2), "walks": round(t2 - t1, 2),
                        "core": round(t3 - t2, 2)}}


class _phase:
    """A step of unknown length, told to ptilab.progress."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        progress.step(self.what, 0, None)

    def __exit__(self, *exc):
        progress.step(self.what, 1, 1)

