"""Build real-kernel fixtures: Debian's Linux booted under QEMU, stopped with a CPU in user mode.

For each configuration this installs what it needs (Debian's qemu-system-x86,
linux-image-amd64, busybox-static, cpio), boots the kernel with a busybox
initramfs under TCG, lets busy loops put the CPUs in user mode, stops the VM
when one is at CPL 3 and saves, through QMP:

  core.elf                      dump-guest-memory (ELF core, PT_LOAD = guest physical)
  cpu<N>.registers.txt          info registers of each CPU
  cpu<N>.info_mem.txt           QEMU's own walk of that CPU's CR3 (the oracle)
  cpu<N>.info_tlb.txt           the same, page by page
  kallsyms.txt dmesg.txt cpuinfo.txt ptdump_*.txt   what the guest printed on its second serial port
  meta.json                     CR3/CR4/EFER/CPL of each CPU, which one is in user mode, versions

Usage: python tests/realkernel/build.py [--config NAME ...] [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGES = ["qemu-system-x86", "linux-image-amd64", "busybox-static", "cpio"]
CONFIGS = {
    "pti-4level": {"append": "pti=on nokaslr", "la57": False},
    "pti-5level": {"append": "pti=on nokaslr", "la57": True},
    "pti-off": {"append": "pti=off nokaslr", "la57": False},
    "pti-kaslr": {"append": "pti=on", "la57": False},
}
CPUS = 2
BOOT_TIMEOUT = 180
MARK = "@@PTILAB"

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
echo 0 > /proc/sys/kernel/kptr_restrict
section() { echo "@@PTILAB $1"; cat "$2" 2>/dev/null; }
{
  echo "@@PTILAB uname"; uname -r
  section kallsyms /proc/kallsyms
  echo "@@PTILAB dmesg"; dmesg
  section cpuinfo /proc/cpuinfo
  for f in kernel current_user current_kernel; do
    [ -r /sys/kernel/debug/page_tables/$f ] && section ptdump_$f /sys/kernel/debug/page_tables/$f
  done
  echo "@@PTILAB end"
} > /dev/ttyS1
sync
i=0
while [ $i -lt 2 ]; do
  taskset -c $i sh -c 'while :; do :; done' &
  i=$((i + 1))
done
echo "PTILAB-READY"
while :; do sleep 1000; done
"""


def say(msg: str) -> None:
    print(f"realkernel: {msg}", flush=True)


def die(msg: str) -> None:
    print(f"realkernel: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def ensure_packages() -> None:
    missing = [p for p in PACKAGES
               if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if not missing:
        return
    if os.geteuid() != 0:
        die(f"missing Debian packages {' '.join(missing)} and not root to install them")
    say(f"installing {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            die(f"{' '.join(cmd[:2])} failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")


def kernel_image() -> Path:
    images = sorted(glob.glob("/boot/vmlinuz-*"))
    if not images:
        die("no /boot/vmlinuz-* after installing linux-image-amd64")
    return Path(images[-1])


def build_initramfs(work: Path) -> Path:
    root = work / "root"
    for d in ("bin", "proc", "sys", "dev", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    files = subprocess.run(["find", "."], cwd=root, capture_output=True, text=True, check=True).stdout
    archive = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files.encode(),
                             capture_output=True, check=True).stdout
    out = work / "initramfs.gz"
    out.write_bytes(gzip.compress(archive))
    return out


class Qmp:
    """QEMU Machine Protocol over a unix socket: JSON commands, JSON answers."""

    def __init__(self, path: Path, deadline: float):
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                if time.time() > deadline:
                    die("QEMU's QMP socket never appeared")
                time.sleep(0.2)
        self.sock.settimeout(600)
        self.buf = b""
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                die("QEMU closed the QMP socket")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, **arguments) -> object:
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                die(f"QMP {command} failed: {reply['error'].get('desc')}")

    def hmp(self, line: str, cpu: int | None = None) -> str:
        args = {"command-line": line}
        if cpu is not None:
            args["cpu-index"] = cpu
        return str(self.execute("human-monitor-command", **args))


def register(text: str, name: str) -> int:
    m = re.search(rf"\b{name}=([0-9a-fA-F]+)", text)
    if not m:
        die(f"no {name} in QEMU's info registers")
    return int(m.group(1), 16)


def split_sections(data: str, out: Path) -> dict[str, str]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in data.splitlines():
        if line.startswith(MARK + " "):
            current = line[len(MARK) + 1:].strip()
            sections[current] = []
        elif current is not None:
            sections[current].append(line.rstrip("\r"))
    if "end" not in sections:
        die("the guest did not finish writing its second serial port")
    names = {"kallsyms": "kallsyms.txt", "dmesg": "dmesg.txt", "cpuinfo": "cpuinfo.txt",
             "ptdump_kernel": "ptdump_kernel.txt", "ptdump_current_user": "ptdump_current_user.txt",
             "ptdump_current_kernel": "ptdump_current_kernel.txt"}
    for key, fname in names.items():
        if key in sections:
            (out / fname).write_text("\n".join(sections[key]) + "\n")
    return {k: "\n".join(v) for k, v in sections.items()}


def build(config: str, out_root: Path, force: bool) -> None:
    spec = CONFIGS[config]
    out = out_root / config
    meta_path = out / "meta.json"
    if not force and meta_path.exists() and meta_path.stat().st_mtime > Path(__file__).stat().st_mtime:
        say(f"{config}: up to date")
        return
    started = time.time()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    vmlinuz = kernel_image()
    with tempfile.TemporaryDirectory(prefix="ptilab-qemu-") as tmp:
        work = Path(tmp)
        initrd = build_initramfs(work)
        console, data, qmp_path = work / "console.log", work / "data.txt", work / "qmp.sock"
        cpu = "qemu64,vendor=GenuineIntel" + (",+la57" if spec["la57"] else "")
        append = f"console=ttyS0 panic=-1 quiet loglevel=4 {spec['append']}"
        cmd = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", cpu, "-m", "256M",
               "-smp", str(CPUS), "-kernel", str(vmlinuz), "-initrd", str(initrd), "-append", append,
               "-display", "none", "-no-reboot", "-serial", f"file:{console}", "-serial", f"file:{data}",
               "-qmp", f"unix:{qmp_path},server=on,wait=off"]
        say(f"{config}: booting {vmlinuz.name} ({cpu}; {spec['append']})")
        qemu = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.time() + BOOT_TIMEOUT
            qmp = Qmp(qmp_path, deadline)
            while "PTILAB-READY" not in (console.read_text(errors="replace") if console.exists() else ""):
                if qemu.poll() is not None:
                    die(f"{config}: QEMU exited early: {qemu.stderr.read().decode(errors='replace').strip()[-300:]}")
                if time.time() > deadline:
                    die(f"{config}: the guest did not reach user space in {BOOT_TIMEOUT} s")
                time.sleep(0.5)
            time.sleep(2)  # let the busy loops get going
            sections = split_sections(data.read_text(errors="replace"), out)
            regs: list[str] = []
            for attempt in range(50):
                qmp.execute("stop")
                regs = [qmp.hmp("info registers", cpu=i) for i in range(CPUS)]
                if any(register(r, "CPL") == 3 for r in regs):
                    break
                qmp.execute("cont")
                time.sleep(0.05 * (attempt + 1))
            else:
                die(f"{config}: no CPU was in user mode in 50 tries")
            cpus = []
            for i, text in enumerate(regs):
                (out / f"cpu{i}.registers.txt").write_text(text)
                (out / f"cpu{i}.info_mem.txt").write_text(qmp.hmp("info mem", cpu=i))
                (out / f"cpu{i}.info_tlb.txt").write_text(qmp.hmp("info tlb", cpu=i))
                cpus.append({"index": i, "cr3": register(text, "CR3"), "cr4": register(text, "CR4"),
                             "efer": register(text, "EFER"), "cpl": register(text, "CPL"),
                             "rip": register(text, "RIP")})
            say(f"{config}: dumping guest memory")
            qmp.execute("dump-guest-memory", paging=False, protocol=f"file:{out / 'core.elf'}")
            version = qmp.execute("query-version")
            qmp.execute("quit")
            qemu.wait(timeout=30)
        finally:
            if qemu.poll() is None:
                qemu.kill()
                qemu.wait()
        dmesg = sections.get("dmesg", "")
        meta = {
            "config": config,
            "kernel_release": sections.get("uname", "").strip(),
            "vmlinuz": str(vmlinuz),
            "qemu_version": "{major}.{minor}.{micro}".format(**version["qemu"]),
            "append": append,
            "la57": spec["la57"],
            "pti": "isolation: enabled" in dmesg,
            "kaslr": "nokaslr" not in append,
            "ptdump_available": "ptdump_current_user" in sections,
            "cpus": cpus,
            "user_cpu": next(c["index"] for c in cpus if c["cpl"] == 3),
        }
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    say(f"{config}: done in {time.time() - started:.0f} s (pti {'on' if meta['pti'] else 'off'}, "
        f"user CPU {meta['user_cpu']}, CR3 {cpus[meta['user_cpu']]['cr3']:#x})")


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the real-kernel fixtures under QEMU.")
    parser.add_argument("--config", action="append", choices=sorted(CONFIGS), help="default: all")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    ensure_packages()
    for config in args.config or list(CONFIGS):
        build(config, args.out, args.force)


if __name__ == "__main__":
    main()
