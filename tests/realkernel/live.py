"""`ptilab audit --live` inside a real guest: Debian's kernel under QEMU, the host's root as its root.

The guest boots a fixture's kernel (LIVE_CONFIGS: Debian 6.1 for `live`, 7.2
for `live-7.2`; pti=on, KASLR on) with a busybox
initramfs that loads the kernel package's 9p modules and what they depend on
(6.1: virtio, 9pnet, netfs, fscache; 7.2 builds virtio in), mounts the host's
root filesystem read-only over virtio-9p, mounts proc, sys, dev, debugfs and
securityfs inside it, a second (writable) share over its /mnt, and chroots
there: the host's Python, numpy and this checkout's src run unchanged. In it:

  live.json / live.txt     ptilab audit --live --json, and as text (exit codes in *.rc)
  dump_live.txt            ptilab dump --live (the user tables, ptdump text)
  nobody.txt               ptilab audit --live as uid 65534 (must refuse: not root)
  lockdown.txt             after `echo confidentiality > /sys/kernel/security/lockdown` (must refuse)
  timings.txt              seconds per step, measured in the guest

Then the host stops the VM and saves `dump-guest-memory` as guest.elf: the
same guest, audited from outside.

Usage: python tests/realkernel/live.py [--out DIR] [--config live|live-7.2] [--force]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import build  # noqa: E402  (tests/realkernel/build.py: Qmp, packages, kernel image)

# Each live guest and the fixture config whose kernel it boots (as build.py fetches it).
LIVE_CONFIGS = {"live": "pti-4level", "live-7.2": "7.2-pti-kaslr"}
APPEND = "console=ttyS0 panic=-1 quiet loglevel=4 pti=on"
MEMORY = "512M"
# The host's numpy is built for x86-64-v2 (SSSE3, SSE4.1/4.2, POPCNT, CX16): qemu64 alone has
# SIGILL'd it. Still an Intel without ARCH_CAPABILITIES, so the kernel turns PTI on.
CPU = "qemu64,vendor=GenuineIntel,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16"
BOOT_TIMEOUT = 120
GUEST_TIMEOUT = 900  # QEMU start -> the guest's last marker: Python over 9p under TCG is slow
# What mounting the host's root over virtio-9p takes; what these need comes along (build.py).
MODULES = ["virtio_pci", "9pnet_virtio", "9p"]
DONE = "@@LIVE-DONE"
# Drop to nobody after the imports: /root (where pyenv keeps this Python) is closed to nobody.
AS_NOBODY = ("import os, sys, numpy, ptilab.cli, ptilab.audit.live, ptilab.audit.checks, ptilab.report.tables; "
             "os.setgroups([]); os.setgid(65534); os.setuid(65534); ptilab.cli.main(sys.argv[1:])")

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
echo "@@LIVE-BOOTED $(uname -r) uptime $(cut -d' ' -f1 /proc/uptime)"
for m in /modules/*.ko; do insmod $m || echo "@@LIVE-FAIL insmod $m"; done
mkdir -p /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose hostroot /newroot || echo "@@LIVE-FAIL mount hostroot"
mount -t 9p -o trans=virtio,version=9p2000.L out /newroot/mnt || echo "@@LIVE-FAIL mount out"
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mount -t debugfs debugfs /newroot/sys/kernel/debug
mount -t securityfs securityfs /newroot/sys/kernel/security
echo "@@LIVE-MOUNTED uptime $(cut -d' ' -f1 /proc/uptime)"
chroot /newroot /bin/sh /mnt/steps.sh
echo "@@LIVE-DONE uptime $(cut -d' ' -f1 /proc/uptime)"
while :; do sleep 1000; done
"""

# Runs in the chroot (the host's root); @PY@ and @SRC@ are filled in.
STEPS = r"""cd /mnt
export PYTHONPATH=@SRC@ HOME=/mnt NO_COLOR=1 COLUMNS=200
t() { cut -d' ' -f1 /proc/uptime; }
step() { name=$1; shift; s=$(t); "$@"; echo $? > $name.rc; echo "$name $s $(t)" >> timings.txt; }
step import @PY@ -c "import numpy, click, rich, ptilab.cli, ptilab.audit.live; assert ptilab.__file__.startswith('@SRC@/')"
step live step_json
step text @PY@ -m ptilab.cli audit --live > live.txt 2>&1
step dump @PY@ -m ptilab.cli dump --live > dump_live.txt 2>&1
step nobody @PY@ -c "@NOBODY@" audit --live > nobody.txt 2>&1
echo confidentiality > /sys/kernel/security/lockdown
step lockdown @PY@ -m ptilab.cli audit --live > lockdown.txt 2>&1
cat /sys/kernel/security/lockdown > lockdown_state.txt
uname -r > uname.txt
sync
"""


def say(msg: str) -> None:
    print(f"realkernel: live: {msg}", flush=True)


def build_initramfs(work: Path, kernel: build.Kernel) -> Path:
    root = work / "root"
    for d in ("bin", "dev", "proc", "sys", "modules"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    if "9p" not in build.add_modules(root / "modules", kernel, MODULES):
        raise build.Failure(f"{kernel.package} has no 9p.ko: the 9p modules come with the kernel's package")
    files = subprocess.run(["find", "."], cwd=root, capture_output=True, text=True, check=True).stdout
    archive = subprocess.run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], cwd=root,
                             input=files.encode(), capture_output=True, check=True).stdout
    out = work / "initramfs.cpio.gz"
    out.write_bytes(gzip.compress(archive, 1))
    return out


def fingerprint() -> str:
    """What the guest's results depend on: this script and ptilab's code (the verdict reaches
    from the readers through linux/ to the tables), so a change there boots the guest again."""
    files = [Path(__file__), *sorted((REPO / "src" / "ptilab").rglob("*.py"))]
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def up_to_date(dest: Path) -> bool:
    try:
        return json.loads((dest / "meta.json").read_text()).get("fingerprint") == fingerprint()
    except (OSError, ValueError):
        return False


def run(out: Path, config: str, force: bool = False) -> Path:
    """Boot, let the guest audit itself, dump it; the results land in out/CONFIG."""
    dest = out / config
    if not force and up_to_date(dest):
        say(f"up to date ({dest / 'meta.json'}), skipped")
        return dest
    started = time.time()
    stamp = fingerprint()  # of the code the guest is about to run
    build.ensure_packages()
    fixture = LIVE_CONFIGS[config]
    spec = build.CONFIGS[fixture]
    kernel = build.prepare_kernels([fixture], out / ".cache")[(spec.release, spec.flavour)]
    if isinstance(kernel, build.Failure):
        raise kernel
    # The interpreter as the tests were started, not its target: a virtualenv's bin/python finds the
    # venv's packages only when run by that path (its pyvenv.cfg sits beside it).
    python = os.path.abspath(sys.executable)
    stage = make_stage(out, config, python)
    with tempfile.TemporaryDirectory(prefix="ptilab-live-") as tmp:
        work = Path(tmp)
        initrd = build_initramfs(work, kernel)
        guest_done = boot_guest(work, stage, kernel.vmlinuz, initrd, started)
    meta = {"config": config, "fingerprint": stamp, "append": APPEND, "cpu": CPU, "memory": MEMORY,
            "vmlinuz": str(kernel.vmlinuz), "python": python,
            "seconds": round(time.time() - started, 1), "guest_seconds": round(guest_done - started, 1)}
    (stage / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    stage.rename(dest)
    say(f"done in {meta['seconds']} s -> {dest}")
    return dest


def make_stage(out: Path, config: str, python: str) -> Path:
    """The directory the guest writes its results to (over 9p), with the steps it runs."""
    stage = out / f".{config}.partial.{os.getpid()}"  # two test runs at once each boot their own guest
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    steps = (STEPS.replace("@PY@", python).replace("@SRC@", str(REPO / "src")).replace("@NOBODY@", AS_NOBODY)
             .replace("step_json", f"{python} -m ptilab.cli audit --live --json > live.json 2> live.err"))
    (stage / "steps.sh").write_text(steps)
    stage.chmod(0o777)  # the guest writes here through 9p as root and as nobody
    return stage


def boot_guest(work: Path, stage: Path, vmlinuz: Path, initrd: Path, started: float) -> float:
    """Run the guest until it has audited itself, then dump its memory to stage/guest.elf.
    Returns when the guest finished its steps."""
    console, qmp_path = work / "console.log", work / "qmp.sock"
    cmd = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", CPU,
           "-m", MEMORY, "-smp", "2", "-kernel", str(vmlinuz), "-initrd", str(initrd), "-append", APPEND,
           "-display", "none", "-vga", "none", "-nic", "none", "-no-reboot",
           "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
           "-virtfs", f"local,path={stage},mount_tag=out,security_model=none,multidevs=remap",
           "-serial", f"file:{console}", "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    say(f"booting {vmlinuz.name} ({APPEND}) with the host's root over 9p")
    qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(work / "qemu.stderr", "wb"), start_new_session=True)
    qmp = None
    try:
        deadline = started + GUEST_TIMEOUT
        qmp = build.Qmp(qmp_path, qemu, min(deadline, time.time() + BOOT_TIMEOUT))
        qmp.deadline = deadline
        text = wait_for_guest(qemu, console, work / "qemu.stderr", deadline)
        guest_done = time.time()
        say(f"guest done after {guest_done - started:.0f} s: "
            f"{' '.join(l.strip() for l in text.splitlines() if l.startswith('@@LIVE-'))}")
        qmp.execute("stop")
        qmp.execute("dump-guest-memory", paging=False, protocol=f"file:{stage / 'guest.elf'}")
        build.check_core(stage / "guest.elf")
        build.quit_qemu(qemu, qmp, 30)
    finally:
        build.reap_qemu(qemu, qmp)
        if console.exists():
            (stage / "console.txt").write_text(console.read_text(errors="replace"))
    return guest_done


def wait_for_guest(qemu: subprocess.Popen, console: Path, stderr: Path, deadline: float) -> str:
    """The console once the guest printed DONE; a Failure if it failed a step, QEMU died or time ran out."""
    text = ""
    while DONE not in text:
        if qemu.poll() is not None:
            raise build.Failure(f"QEMU exited (code {qemu.returncode}) before {DONE}: "
                                f"{stderr.read_text(errors='replace').strip()[-200:]}")
        if time.time() > deadline:
            raise build.Failure(f"no {DONE} in {GUEST_TIMEOUT} s (console ends: {text.strip().splitlines()[-1:]})")
        time.sleep(0.5)
        text = console.read_text(errors="replace") if console.exists() else ""
    fails = [line for line in text.splitlines() if line.startswith("@@LIVE-FAIL")]
    if fails:
        raise build.Failure(fails[0])
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description="Run ptilab audit --live in a QEMU guest of the fixture kernel.")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--config", choices=sorted(LIVE_CONFIGS), default="live")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    try:
        run(args.out.resolve(), args.config, args.force)
    except build.Failure as e:
        print(f"realkernel: error: {args.config}: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
