"""Build real-kernel fixtures: Debian's Linux booted under QEMU, stopped with a CPU in user mode.

Every configuration names a Debian kernel (release and flavour) and a boot
(kernel command line, 4- or 5-level paging).  The builder

  1. installs what runs the boots (Debian's qemu-system-x86, busybox-static,
     cpio, gcc, make) with the machine's apt-get when missing;
  2. fetches each kernel by package name from Debian's archive with an apt
     configuration of its own (its sources list, lists, cache and an empty
     dpkg status under the fixture cache, out/.cache/): `apt-get download` of
     linux-image-<abi>-<flavour> and the matching linux-headers-<abi>-<flavour>,
     linux-headers-<abi>-common[-rt] and linux-kbuild-*, unpacked with
     `dpkg-deb -x`; nothing is installed on the machine;
  3. builds the oracle module (oracle/ptilab_oracle.c) against those headers;
  4. boots each configuration under TCG with a busybox initramfs (two at a
     time), lets one busy loop per CPU put the CPUs in user mode, loads the
     module and takes the kernel's own ptdump of one stopped (SIGSTOP) task,
     stops the VM when at least one CPU is at CPL 3 and saves, through QEMU's
     monitor (QMP, HMP commands through human-monitor-command):

  core.elf                      dump-guest-memory, no paging, no compression
                                (ELF core, PT_LOAD = guest physical ranges)
  cpu<N>.registers.txt          HMP `info registers` of CPU N
  cpu<N>.info_mem.txt           HMP `info mem` of CPU N (QEMU's walk of its CR3; 4-level only)
  cpu<N>.info_tlb.txt           HMP `info tlb` of CPU N (the same, page by page)
  kallsyms.txt dmesg.txt cpuinfo.txt console.txt
  ptdump_{kernel,current_user,current_kernel}.txt   when the kernel has PTDUMP_DEBUGFS
  oracle_user.txt oracle_kernel.txt   ptdump_walk_pgd_level_debugfs() of the stopped
                                task's user and kernel PGD, just before the freeze
  oracle_task.txt               "pid comm pgd_phys_hex" of that task
  tasks.txt                     the same line for every task with an mm
  meta.json                     versions, release, flavour, command line, kaslr, oracle,
                                CR3/CR4/EFER/CPL/RIP per CPU, which CPU is in user mode

Every core carries the guest's VMCOREINFO note (QEMU's vmcoreinfo device, fed
by the qemu_fw_cfg module the initramfs loads). One configuration (pti-kaslr)
also saves the same memory as users hold it (about 3 s more):

  kdump-zlib.dump               dump-guest-memory -z (and kdump-lzo/-snappy/-zstd where QEMU has them)
  kdump.elf                     core.elf as kdump's vmcore: NT_PRSTATUS + VMCOREINFO notes, no CR3
  makedumpfile-{zlib,lzo}.dump  makedumpfile -c / -l -d 31 of kdump.elf (Debian's build lacks snappy, zstd)
  lime.dump                     Debian's LiME (lime-forensics-dkms's source, built against the kernel's headers)
                                run in the guest at boot, writing to a virtio disk: an earlier moment
                                than the other dumps of the same boot

The guest sends its files as gzip'd tars on a second serial port (a host
file, which QEMU writes synchronously) and announces each byte count on the
console; the host checks the counts and unpacks.

Usage: python tests/realkernel/build.py [--config NAME ...] [--out DIR] [--force] [--jobs N]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parents[1] / "src") not in sys.path:
    sys.path.insert(0, str(HERE.parents[1] / "src"))  # the ptilab of this checkout, whatever is installed

# The boot and capture code is ptilab's own (ptilab boot runs the same): one way to boot a kernel.
from ptilab.guest import GuestError  # noqa: E402
from ptilab.guest import qemu  # noqa: E402
from ptilab.guest.capture import BUSY_LOOPS  # noqa: E402
from ptilab.guest.initramfs import initramfs  # noqa: E402
from ptilab.guest.modules import modinfo, module_files  # noqa: E402
from ptilab.guest.modules import modules_with_dependencies as _modules_with_dependencies  # noqa: E402
from ptilab.guest.qemu import Qmp, check_core, cpu_state, qemu_version, quit_qemu, reap_qemu  # noqa: E402,F401
ORACLE_SOURCE = HERE / "oracle"
PACKAGES = ["qemu-system-x86", "busybox-static", "cpio", "gcc", "make", "makedumpfile"]


# An Intel CPU without ARCH_CAPABILITIES: Linux sets X86_BUG_CPU_MELTDOWN on it (cpu_set_bug_bits()).
INTEL = "qemu64,vendor=GenuineIntel"


@dataclass(frozen=True)
class Config:
    """One boot: which Debian kernel, which command line, 4- or 5-level paging."""
    release: str          # the kernel series, a key of SUITES
    flavour: str          # a key of FLAVOURS
    append: str           # the kernel command line's ptilab part
    la57: bool = False    # -cpu ...,+la57: the kernel then runs 5-level paging
    pti: bool = True      # dmesg must (not) say PTI is enabled
    dumps: bool = False   # also kdump-compressed and makedumpfile dumps of the same memory
    lime: bool = True     # with dumps: and a LiME dump (Debian's lime-forensics-dkms, built for the kernel)
    cpu: str = INTEL      # QEMU's -cpu model (TCG); the kernel decides Meltdown exposure from its vendor and family
    console_log: bool = False  # boot without quiet: every message up to init on the serial console

    @property
    def lime_dump(self) -> bool:
        return self.dumps and self.lime


# Debian release of each series; forky is testing, whose kernel moves on (7.2 in November 2026)
SUITES = {"5.10": "bullseye", "6.1": "bookworm", "6.12": "trixie", "7.2": "forky"}
FLAVOURS = {"generic": "amd64", "cloud": "cloud-amd64", "rt": "rt-amd64"}  # package name suffixes
CONFIGS = {
    "pti-4level": Config("6.1", "generic", "pti=on nokaslr"),
    "pti-5level": Config("6.1", "generic", "pti=on nokaslr", la57=True),
    "pti-off": Config("6.1", "generic", "pti=off nokaslr", pti=False),
    "pti-kaslr": Config("6.1", "generic", "pti=on", dumps=True),
    # no pti=: auto mode, on a Meltdown-vulnerable CPU (GenuineIntel, no RDCL_NO) without PCID
    "pti-auto-5level": Config("6.1", "generic", "nokaslr", la57=True),
    "5.10-pti": Config("5.10", "generic", "pti=on nokaslr", console_log=True),
    "5.10-pti-kaslr": Config("5.10", "generic", "pti=on"),
    "6.1-cloud-pti": Config("6.1", "cloud", "pti=on nokaslr"),
    "6.1-cloud-pti-kaslr": Config("6.1", "cloud", "pti=on"),
    # PREEMPT_RT threads the 8250 UART's interrupt; under TCG the thread finds nothing pending often
    # enough that note_interrupt() calls IRQ 3 spurious and disables it, stalling the data port
    # ("irq 3: nobody cared").  noirqdebug turns that detector off.
    "6.1-rt-pti": Config("6.1", "rt", "pti=on nokaslr noirqdebug"),
    "6.1-rt-pti-kaslr": Config("6.1", "rt", "pti=on noirqdebug"),
    "6.12-pti": Config("6.12", "generic", "pti=on nokaslr"),
    "6.12-pti-kaslr": Config("6.12", "generic", "pti=on"),
    "7.2-pti": Config("7.2", "generic", "pti=on nokaslr", console_log=True),
    # forky's lime-forensics-dkms (1.9.1) does not build against 7.2: kernel_bind() now takes a sockaddr_unsized
    "7.2-pti-kaslr": Config("7.2", "generic", "pti=on", dumps=True, lime=False),
    # KASLR under LA57: page_offset_base and friends start from 0xff11000000000000
    "7.2-pti-5level-kaslr": Config("7.2", "generic", "pti=on", la57=True),
    # AMD: cpu_vuln_whitelist says NO_MELTDOWN, so PTI left to the kernel stays off ("Not affected")
    "epyc-auto-kaslr": Config("6.1", "generic", "", pti=False, dumps=True, lime=False, cpu="EPYC"),
    # isolation forced on a CPU that needs none: sysfs still says "Not affected"
    "epyc-pti-on": Config("6.1", "generic", "pti=on nokaslr", cpu="EPYC"),
    # an affected Intel CPU with every mitigation turned off: "Vulnerable"
    "mitigations-off": Config("6.1", "generic", "mitigations=off nokaslr", pti=False),
}
CPUS = 2
MEMORY = "256M"
JOBS = 2                # QEMU boots at once (TCG: one host core per busy guest)
BOOT_TIMEOUT = 240      # QEMU start -> guest ready marker (two boots share 2 cores)
CONFIG_TIMEOUT = 480    # everything for one configuration
USER_MODE_TRIES = 200   # stop / look / cont rounds before giving up
PTI_ENABLED = "Kernel/User page tables isolation: enabled"
READY = "@@PTILAB-READY"
SECTION_FILES = {
    "kallsyms": "kallsyms.txt",
    "dmesg": "dmesg.txt",
    "cpuinfo": "cpuinfo.txt",
    "vulnerabilities": "vulnerabilities.txt",
    "ptdump_kernel": "ptdump_kernel.txt",
    "ptdump_current_user": "ptdump_current_user.txt",
    "ptdump_current_kernel": "ptdump_current_kernel.txt",
    "oracle_user": "oracle_user.txt",
    "oracle_kernel": "oracle_kernel.txt",
    "oracle_task": "oracle_task.txt",
    "oracle_tasks": "tasks.txt",
}

# Runs as PID 1 in the guest.  The console (ttyS0) gets progress markers; the
# files go as gzip'd tars on the data port (ttyS1, a host file) put in raw
# mode, and each byte count is printed on the console so the host can check it
# has them all.  (Plain text on a serial port runs at ~220 KB/s under TCG here:
# 18 s for kallsyms alone; gzip -1 makes it ~5 times smaller.)  The oracle's
# ptdumps go last, in a small second tar, to keep the time between them and the
# host's freeze short: the stopped task's tables cannot change, but the kernel
# PGD's vmalloc area does whenever a process starts or ends.
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
dmesg -n 4  # from here the console gets warnings and worse only: no message cuts into a marker line
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
for m in /lib/fw_cfg/*.ko; do insmod $m 2>/dev/null; done  # hands the kernel's VMCOREINFO to QEMU's vmcoreinfo device
exec </dev/console >/dev/console 2>&1
echo "@@PTILAB-BOOTED $(uname -r) uptime $(cut -d' ' -f1 /proc/uptime)"
if [ -r /lib/lime.ko ] && grep -qs 0x1af4 /sys/bus/pci/devices/*/vendor; then
  # a virtio disk is attached: LiME dumps RAM onto it (format=lime, no page skipped)
  for m in /lib/virtio/*.ko; do insmod $m; done
  i=0
  while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  insmod /lib/lime.ko "path=/dev/vda format=lime timeout=0" && echo "@@PTILAB-LIME uptime $(cut -d' ' -f1 /proc/uptime)"
fi
echo 0 > /proc/sys/kernel/kptr_restrict
echo 0 > /proc/sys/kernel/dmesg_restrict
mkdir -p /tmp/out /tmp/oracle
cd /tmp/out
uname -r > uname
cat /proc/cmdline > cmdline
cat /proc/kallsyms > kallsyms
dmesg > dmesg
cat /proc/cpuinfo > cpuinfo
grep . /sys/devices/system/cpu/vulnerabilities/* > vulnerabilities 2>/dev/null
ls /sys/kernel/debug/page_tables > ptdump_ls 2>/dev/null
for f in kernel current_user current_kernel; do
  [ -r /sys/kernel/debug/page_tables/$f ] && cat /sys/kernel/debug/page_tables/$f > ptdump_$f
done
tar -cf - * | gzip -1 > /tmp/out.tgz
stty -F /dev/ttyS1 raw -echo
cat /tmp/out.tgz > /dev/ttyS1
echo "@@PTILAB-DATA $(wc -c < /tmp/out.tgz) bytes, uptime $(cut -d' ' -f1 /proc/uptime)"
""" + BUSY_LOOPS + r"""# more tasks with an mm of their own, then the one whose tables the oracle dumps
sleep 100000 &
sleep 100000 &
sh -c 'while :; do :; done' &
target=$!
kill -STOP $target
cd /tmp/oracle
if [ -e /oracle.ko ] && insmod /oracle.ko pid=$target 2> insmod; then
  d=/sys/kernel/debug/ptilab_oracle
  cat $d/task > oracle_task
  cat $d/tasks > oracle_tasks
  cat $d/user > oracle_user
  cat $d/kernel > oracle_kernel
  echo "@@PTILAB-PTDUMP uptime $(cut -d' ' -f1 /proc/uptime)"
else
  echo "no oracle module" >> insmod
fi
tar -cf - * | gzip -1 > /tmp/oracle.tgz
cat /tmp/oracle.tgz > /dev/ttyS1
echo "@@PTILAB-ORACLE $(wc -c < /tmp/oracle.tgz) bytes, uptime $(cut -d' ' -f1 /proc/uptime)"
echo "@@PTILAB-READY $n busy loops, uptime $(cut -d' ' -f1 /proc/uptime)"
# wait is a builtin and the busy loops never end: no process starts after the
# oracle listed the tasks, so the CPU the host freezes in user mode runs one of them
# (a `sleep` here once put a fresh, unlisted mm on that CPU at the freeze)
while :; do wait; done
"""

# gcc-12 stands in for the compiler a kernel was built with (bullseye: gcc-10,
# trixie: gcc-14).  The one gcc-14 option the 6.12 headers pass is
# -fmin-function-alignment=N; gcc-12's -falign-functions=N aligns the same.
GCC_WRAPPER = """#!/bin/sh
for a; do
  shift
  case $a in
    -fmin-function-alignment=*) set -- "$@" "-falign-functions=${a#*=}" ;;
    *) set -- "$@" "$a" ;;
  esac
done
exec gcc "$@"
"""


# One-line reason the build failed: the guest code's own error, so a QEMU or guest failure is one too.
Failure = GuestError


class Terminated(BaseException):
    """SIGTERM or SIGHUP: unwind (killing QEMU on the way) and exit."""


def _terminate(signum, _frame):
    raise Terminated(signum)


_print_lock = threading.Lock()


def say(msg: str) -> None:
    with _print_lock:
        print(f"realkernel: {msg}", flush=True)


def run(cmd: list[str], what: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run a command; Failure with its last line of output when it fails."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise Failure(f"{what} timed out") from None
    if done.returncode:
        last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or [f"exit {done.returncode}"]
        raise Failure(f"{what} failed: {last[0]}")
    return done


# -- host setup ----------------------------------------------------------------

def installed(package: str) -> bool:
    done = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return done.returncode == 0 and done.stdout.strip() == "install ok installed"


def ensure_packages() -> None:
    """The machine's own apt-get installs what runs the boots (not the kernels)."""
    missing = [p for p in PACKAGES if not installed(p)]
    if not missing:
        say(f"packages present: {' '.join(PACKAGES)}")
        return
    apt_install(missing)


def apt_install(packages: list[str]) -> None:
    missing = [p for p in packages if not installed(p)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise Failure(f"missing Debian packages {' '.join(missing)} and not root to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    for cmd in (["apt-get", *lock, "update", "-qq"],
                ["apt-get", *lock, "install", "-y", "-qq", "--no-install-recommends", *missing]):
        say(f"running {' '.join(cmd)}")
        run(cmd, " ".join(cmd), timeout=1200, env=env)
    still = [p for p in missing if not installed(p)]
    if still:
        raise Failure(f"apt-get did not install {' '.join(still)}")


# -- Debian's archive, through an apt configuration of the builder's own -----------

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"


class Archive:
    """apt-get / apt-cache for one Debian suite with state only under `cache`.

    Its own sources list (the suite and its security updates, where kernels'
    point releases land first), lists, package cache and an empty dpkg status,
    so the machine's apt state is neither read nor changed."""

    def __init__(self, cache: Path, suite: str):
        self.suite = suite
        self.root = cache / "apt" / suite
        self.debs = cache / "debs"
        self._lock = threading.RLock()  # one apt-get at a time per suite: kernels share linux-kbuild-*
        self._updated = False

    def options(self) -> list[str]:
        r = self.root
        opts = {"Dir::Etc::SourceList": r / "sources.list", "Dir::Etc::SourceParts": r / "sources.list.d",
                "Dir::State": r / "state", "Dir::State::Lists": r / "lists",
                "Dir::State::status": r / "status", "Dir::Cache": r / "cache",
                # testing's Release files expire a week after signing: a mirror that has
                # not synced since must still serve the kernel it holds
                "Acquire::Check-Valid-Until": "false"}
        if os.geteuid() == 0:
            opts["APT::Sandbox::User"] = "root"  # _apt cannot write into the cache directories
        return [a for k, v in opts.items() for a in ("-o", f"{k}={v}")]

    def update(self, force: bool = False) -> None:
        """apt-get update into the own lists, once (the lists are kept in the cache)."""
        with self._lock:
            stamp = self.root / "updated"
            if not force and (self._updated or stamp.exists()):
                return
            for d in ("sources.list.d", "state", "lists/partial", "cache/archives/partial"):
                (self.root / d).mkdir(parents=True, exist_ok=True)
            (self.root / "status").touch()
            (self.root / "sources.list").write_text(
                f"deb [signed-by={KEYRING}] {MIRROR} {self.suite} main\n"
                f"deb [signed-by={KEYRING}] {SECURITY} {self.suite}-security main\n")
            t0 = time.time()
            run(["apt-get", *self.options(), "-qq", "update"], f"apt-get update ({self.suite})")
            stamp.touch()
            self._updated = True
            say(f"{self.suite}: package lists updated in {time.time() - t0:.1f} s")

    def depends(self, package: str) -> list[str]:
        """The packages `package` depends on (first alternatives)."""
        self.update()
        out = run(["apt-cache", *self.options(), "depends", "--no-recommends", "--no-suggests", package],
                  f"apt-cache depends {package} ({self.suite})").stdout
        return [m.group(1) for m in re.finditer(r"^\s*\|?Depends: (\S+)", out, re.M)
                if not m.group(1).startswith("<")]

    def download(self, packages: list[str]) -> list[Path]:
        """The .deb of each package, fetched once into the shared deb cache."""
        self.debs.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._download([p for p in packages if not any(self.debs.glob(f"{p}_*.deb"))])
        return [sorted(self.debs.glob(f"{p}_*.deb"))[-1] for p in packages]

    def _download(self, missing: list[str]) -> None:
        if missing:
            self.update()
            t0 = time.time()
            try:
                run(["apt-get", *self.options(), "-qq", "download", *missing], f"apt-get download ({self.suite})",
                    cwd=self.debs)
            except Failure:  # the lists are older than the archive: a point release replaced the package
                self.update(force=True)
                run(["apt-get", *self.options(), "-qq", "download", *missing], f"apt-get download ({self.suite})",
                    cwd=self.debs)
            size = sum(f.stat().st_size for p in missing for f in self.debs.glob(f"{p}_*.deb"))
            say(f"{self.suite}: downloaded {' '.join(missing)} ({size / 1e6:.0f} MB in {time.time() - t0:.1f} s)")


def extract(deb: Path, root: Path) -> None:
    """dpkg-deb -x, once per .deb and root."""
    stamp = root / ".extracted" / deb.name
    if stamp.exists():
        return
    root.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "-x", str(deb), str(root)], f"dpkg-deb -x {deb.name}")
    stamp.parent.mkdir(exist_ok=True)
    stamp.touch()


@dataclass
class Kernel:
    """A Debian kernel unpacked under the cache, and its oracle module if that built."""
    release: str
    flavour: str
    uname: str                  # e.g. 6.1.0-57-amd64: `uname -r`, the package names' middle
    package: str                # linux-image-<uname>
    version: str                # the package's version (from the .deb's name)
    root: Path                  # image, headers, kbuild unpacked here
    module: Path | None = None
    module_error: str = ""
    lime: Path | None = None   # Debian's LiME built for it (configs with dumps)
    notes: list[str] = field(default_factory=list)

    @property
    def vmlinuz(self) -> Path:
        boot = self.root / "boot" / f"vmlinuz-{self.uname}"
        return boot if boot.exists() else self.root / "usr/lib/modules" / self.uname / "vmlinuz"  # 7.x

    @property
    def headers(self) -> Path:
        return self.root / "usr" / "src" / f"linux-headers-{self.uname}"


def fetch_kernel(archive: Archive, cache: Path, release: str, flavour: str) -> Kernel:
    """linux-image-<flavour> of the suite, resolved to its ABI package, with its headers."""
    image = archive.depends(f"linux-image-{FLAVOURS[flavour]}")
    image = [p for p in image if p.startswith("linux-image-")][:1]
    if not image:
        raise Failure(f"{archive.suite} has no linux-image-{FLAVOURS[flavour]}")
    uname = image[0].removeprefix("linux-image-").removesuffix("-unsigned")
    headers = f"linux-headers-{uname}"
    # -common[-rt] holds the headers, linux-kbuild-* the tools that build modules
    needed = [p for p in archive.depends(headers) if p.startswith(("linux-headers-", "linux-kbuild-"))]
    # since 7.x linux-image-<abi> is a shell: vmlinuz is in linux-binary-<abi>, the modules in linux-modules-<abi>
    needed += [p for p in archive.depends(image[0]) if p.startswith(("linux-binary-", "linux-modules-"))]
    debs = archive.download([image[0], headers, *needed])
    root = cache / "kernels" / uname
    for deb in debs:
        extract(deb, root)
    version = debs[0].name.split("_")[1]
    kernel = Kernel(release, flavour, uname, image[0], version, root)
    if not kernel.vmlinuz.exists():
        raise Failure(f"{image[0]} and its linux-binary- package hold no vmlinuz for {uname}")
    kernel.vmlinuz.chmod(0o644)  # Debian ships it 0600
    return kernel


# -- the oracle module -----------------------------------------------------------------

def kbuild_tool_overrides(kernel: Kernel, archive: Archive, cache: Path) -> list[str]:
    """make variables that run the headers' own modpost and objtool under the suite's glibc,
    when the host's is older than the one they were linked against (trixie's 2.38+ here)."""
    kbuild = next(kernel.root.glob("usr/lib/linux-kbuild-*"), None)
    if kbuild is None:
        raise Failure(f"no linux-kbuild directory under {kernel.root}")
    # Debian's modpost and objtool are dispatchers that exec modpost.real-lsb-64 / objtool.real-x86;
    # 7.x ships objtool in the headers package, not in linux-kbuild-*
    tools = {var: next((d / rel for d in (kbuild, kernel.headers) for rel in (real, real.split(".")[0])
                        if (d / rel).exists()), kbuild / real)
             for var, real in (("MODPOST", "scripts/mod/modpost.real-lsb-64"),
                               ("objtool", "tools/objtool/objtool.real-x86"))}
    probe = subprocess.run([str(tools["MODPOST"])], capture_output=True, text=True)
    if "GLIBC_" not in probe.stderr:
        return []
    libc_root = cache / "libc" / archive.suite
    for deb in archive.download(["libc6"]):
        extract(deb, libc_root)
    libdir = libc_root / "usr/lib/x86_64-linux-gnu"
    if not (libdir / "ld-linux-x86-64.so.2").exists():
        libdir = libc_root / "lib/x86_64-linux-gnu"
    bindir = kernel.root / "ptilab-bin"
    bindir.mkdir(exist_ok=True)
    overrides = []
    for var, tool in tools.items():
        wrapper = bindir / tool.name
        wrapper.write_text(f'#!/bin/sh\nexec {libdir}/ld-linux-x86-64.so.2 --library-path {libdir} {tool} "$@"\n')
        wrapper.chmod(0o755)
        overrides.append(f"{var}={wrapper}")
    kernel.notes.append(f"modpost and objtool run under {archive.suite}'s libc6")
    return overrides


def vermagic(ko: Path) -> str:
    """The module's vermagic= string from its .modinfo section."""
    magic = modinfo(ko.read_bytes(), "vermagic")
    if magic is None:
        raise Failure(f"{ko.name} has no vermagic")
    return magic


def modules_with_dependencies(kernel: Kernel, names: list[str]) -> list[tuple[str, bytes]]:
    """The named modules of the kernel's package and those they need, dependencies first
    (ptilab.guest.modules; 7.x keeps them under usr/lib/modules)."""
    trees = [kernel.root / d / "modules" / kernel.uname for d in ("lib", "usr/lib")]
    return _modules_with_dependencies(trees, names)


def make_module(kernel: Kernel, archive: Archive, cache: Path, source: Path, name: str) -> Path:
    """An out-of-tree module built from source against the kernel's own headers package
    (Kbuild's `make -C headers M=dir`, what DKMS runs); returns its .ko."""
    work = kernel.root / name
    ko = work / f"{name}.ko"
    if ko.exists() and ko.stat().st_mtime > max(f.stat().st_mtime for f in source.iterdir()):
        return ko
    # Debian's names /usr/src/linux-headers-* by absolute path: the -common include, and since 7.x KBUILD_OUTPUT
    makefile = kernel.headers / "Makefile"
    text = makefile.read_text()
    makefile.write_text(re.sub(r"(^|[\s=])/usr/src/", rf"\g<1>{kernel.root}/usr/src/", text, flags=re.M))
    gcc = cache / "gcc-wrapper"
    if not gcc.exists() or gcc.read_text() != GCC_WRAPPER:
        gcc.write_text(GCC_WRAPPER)
        gcc.chmod(0o755)
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(source, work)
    # No BTF for the module: pahole is not needed and the module loads without it.
    run(["make", "-C", str(kernel.headers), f"M={work}", f"CC={gcc}", "CONFIG_DEBUG_INFO_BTF_MODULES=",
         *kbuild_tool_overrides(kernel, archive, cache), "modules"], f"make {name} module for {kernel.uname}")
    magic = vermagic(ko)
    if magic.split()[0] != kernel.uname:
        raise Failure(f"{name}.ko's vermagic {magic!r} does not name {kernel.uname}")
    return ko


def build_module(kernel: Kernel, archive: Archive, cache: Path) -> None:
    """oracle/ptilab_oracle.c built against the kernel's own headers (a kernel without it still boots)."""
    t0 = time.time()
    try:
        kernel.module = make_module(kernel, archive, cache, ORACLE_SOURCE, "ptilab_oracle")
    except Failure as e:
        kernel.module_error = str(e)
        say(f"{kernel.uname}: oracle module not built: {e}")
        return
    say(f"{kernel.uname}: oracle module ready in {time.time() - t0:.1f} s (vermagic {vermagic(kernel.module)})")


def build_lime(kernel: Kernel, archive: Archive, cache: Path) -> None:
    """Debian's LiME: lime-forensics-dkms's source, fetched with the kernel's suite
    and built against its headers as DKMS would, installing nothing on this machine."""
    t0 = time.time()
    root = cache / "lime" / archive.suite
    for deb in archive.download(["lime-forensics-dkms"]):
        extract(deb, root)
    source = next(root.glob("usr/src/lime-forensics-*"), None)
    if source is None:
        raise Failure(f"lime-forensics-dkms of {archive.suite} holds no usr/src/lime-forensics-*")
    kernel.lime = make_module(kernel, archive, cache, source, "lime")
    say(f"{kernel.uname}: LiME {source.name.removeprefix('lime-forensics-')} ready in {time.time() - t0:.1f} s")


def prepare_kernels(configs: list[str], cache: Path) -> dict[tuple[str, str], Kernel | Failure]:
    """Each needed (release, flavour): fetched, unpacked, its oracle module built; suites in parallel."""
    wanted = sorted({(CONFIGS[c].release, CONFIGS[c].flavour) for c in configs})
    archives = {r: Archive(cache, SUITES[r]) for r, _ in wanted}
    with_lime = {(CONFIGS[c].release, CONFIGS[c].flavour) for c in configs if CONFIGS[c].lime_dump}

    def one(key: tuple[str, str]) -> Kernel | Failure:
        release, flavour = key
        try:
            kernel = fetch_kernel(archives[release], cache, release, flavour)
        except Failure as e:
            say(f"{release} {flavour}: kernel not fetched: {e}")
            return e
        build_module(kernel, archives[release], cache)
        if key in with_lime:
            try:
                build_lime(kernel, archives[release], cache)
            except Failure as e:
                return Failure(f"LiME not built for {kernel.uname}: {e}")
        return kernel

    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(wanted, pool.map(one, wanted)))


def build_initramfs(work: Path, kernel: Kernel) -> Path:
    """busybox, the init, qemu_fw_cfg, LiME and its virtio-blk driver, the oracle module."""
    files = module_files("lib/fw_cfg", modules_with_dependencies(kernel, ["qemu_fw_cfg"]))
    files.update(lime_files(kernel))
    if kernel.module is not None:
        files["oracle.ko"] = kernel.module.read_bytes()
    out = work / "initramfs.cpio.gz"
    out.write_bytes(initramfs(INIT, files))
    return out


def unpack_data(console_text: str, data: Path) -> dict[str, str]:
    """The guest's files, from the gzip'd tars on the data port, checked against the sizes it announced."""
    sizes = [int(n) for n in re.findall(r"@@PTILAB-(?:DATA|ORACLE) (\d+) bytes", console_text)]
    if not sizes:
        raise Failure("the guest announced no data on its console")
    want = sum(sizes)
    give_up = time.time() + 10  # the UART may still be draining its last bytes
    while (data.stat().st_size if data.exists() else 0) < want and time.time() < give_up:
        time.sleep(0.1)
    blob = data.read_bytes() if data.exists() else b""
    if len(blob) != want:
        raise Failure(f"data port holds {len(blob)} bytes, the guest sent {' + '.join(map(str, sizes))}")
    files: dict[str, str] = {}
    at = 0
    for size in sizes:
        try:
            with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob[at:at + size]))) as tar:
                files.update({member.name.removeprefix("./"): tar.extractfile(member).read().decode(errors="replace")
                              for member in tar.getmembers() if member.isfile()})
        except (OSError, EOFError, tarfile.TarError) as e:
            raise Failure(f"the guest's data does not unpack: {e}") from None
        at += size
    return files


def check_sections(config: str, spec: Config, sections: dict[str, str]) -> None:
    for name in ("uname", "kallsyms", "dmesg", "cpuinfo", "vulnerabilities"):
        if not sections.get(name, "").strip():
            raise Failure(f"the guest sent no {name}")
    symbols = sections["kallsyms"].splitlines()
    if len(symbols) < 10000 or all(s.startswith("0000000000000000") for s in symbols[:100]):
        raise Failure(f"kallsyms looks restricted or short ({len(symbols)} lines)")
    if spec.pti != (PTI_ENABLED in sections["dmesg"]):
        raise Failure(f"dmesg {'lacks' if spec.pti else 'has'} '{PTI_ENABLED}' on {config}")
    flags = " ".join(l for l in sections["cpuinfo"].splitlines() if l.startswith("flags"))
    if spec.la57 != (" la57" in flags):
        raise Failure(f"guest cpuinfo flags {'lack' if spec.la57 else 'have'} la57 on {config}")


# -- the same memory in the formats users hold ---------------------------------------

def add_modules(directory: Path, kernel: Kernel, names: list[str]) -> list[str]:
    """The named modules and what they need, as directory/NN-name.ko in load order
    (the init's `for m in DIR/*.ko; do insmod $m; done`); returns their names."""
    modules = modules_with_dependencies(kernel, names)
    directory.mkdir(parents=True, exist_ok=True)
    for path, data in module_files(".", modules).items():
        (directory / path).write_bytes(data)
    return [name for name, _ in modules]


def lime_files(kernel: Kernel) -> dict[str, bytes]:
    """lib/lime.ko and the virtio-blk driver it writes through, when LiME was built."""
    if kernel.lime is None:
        return {}
    virtio = modules_with_dependencies(kernel, ["virtio_pci", "virtio_blk"])
    if "virtio_blk" not in [name for name, _ in virtio]:
        raise Failure(f"no virtio_blk.ko for {kernel.uname}: LiME would have no disk to write to")
    return {"lib/lime.ko": kernel.lime.read_bytes(), **module_files("lib/virtio", virtio)}


def lime_from_disk(disk: Path, out: Path) -> int:
    """The LiME file from the start of the guest's disk: its ranges, cut where
    the headers stop (the rest of the disk is zeros). Returns the range count."""
    ranges, end = 0, 0
    with disk.open("rb") as f:
        while True:
            f.seek(end)
            head = f.read(32)
            if len(head) < 32 or struct.unpack_from("<I", head)[0] != 0x4C694D45:
                break
            start, last = struct.unpack_from("<QQ", head, 8)
            end += 32 + last - start + 1
            ranges += 1
    if not ranges:
        raise Failure("LiME wrote nothing to the guest's disk")
    with disk.open("rb") as src, out.open("wb") as dst:
        dst.truncate(end)
        at = 0
        while at < end:
            at += os.copy_file_range(src.fileno(), dst.fileno(), end - at, at, at)
    out.chmod(0o644)
    return ranges


def add_lime_disk(cmd: list[str], work: Path, kernel: Kernel) -> bool:
    """A sparse virtio disk the size of RAM and more, for LiME to write to (if LiME is in the initramfs)."""
    if kernel.lime is None:
        return False
    disk = work / "lime.img"
    with disk.open("wb") as f:
        f.truncate(int(MEMORY.rstrip("M")) * 2 << 20)
    cmd += ["-drive", f"file={disk},if=virtio,format=raw"]
    return True


def dump_formats(qmp: Qmp, stage: Path, config: str) -> None:
    """The stopped guest again in QEMU's kdump-compressed formats (those this QEMU has)."""
    t0 = time.time()
    formats = [f for f in qmp.execute("query-dump-guest-memory-capability")["formats"] if f.startswith("kdump-")]
    for fmt in formats:
        qmp.execute("dump-guest-memory", paging=False, protocol=f"file:{stage / (fmt + '.dump')}", format=fmt)
        (stage / (fmt + ".dump")).chmod(0o644)
    say(f"{config}: QEMU {' '.join(formats)} dumps in {time.time() - t0:.1f} s")


def kdump_elf(core: Path, kallsyms: str, out: Path) -> None:
    """core.elf reshaped as kdump's ELF vmcore (/proc/vmcore as kexec-tools'
    elfcorehdr describes it): notes NT_PRSTATUS and VMCOREINFO only (no QEMU
    CPU notes, so no CR3), PT_LOADs with the direct-map virtual address
    page_offset_base + physical, data page-aligned. makedumpfile reads it;
    QEMU's own paging-mode ELF it cannot (with PTI's 65536 espfix aliases it
    needs PN_XNUM program headers, which makedumpfile 1.7.2 does not read)."""
    with core.open("rb") as f:
        head = f.read(64)
        e_phoff, = struct.unpack_from("<Q", head, 32)
        e_phnum, = struct.unpack_from("<H", head, 56)
        f.seek(e_phoff)
        phdrs = [struct.unpack_from("<IIQQQQQQ", f.read(56)) for _ in range(e_phnum)]
        notes = b""
        for p_type, _, offset, _, _, filesz, _, _ in phdrs:
            if p_type == 4:
                f.seek(offset)
                notes += f.read(filesz)
    kept, info, at = b"", "", 0
    while at + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, at)
        size = 12 + -(-namesz // 4) * 4 + -(-descsz // 4) * 4
        name = notes[at + 12:at + 12 + namesz].rstrip(b"\0")
        if (name, ntype) == (b"CORE", 1) or name == b"VMCOREINFO":
            kept += notes[at:at + size]
        if name == b"VMCOREINFO":
            info = notes[at + 12 + -(-namesz // 4) * 4:][:descsz].decode(errors="replace")
        at += size
    m = re.search(r"NUMBER\(phys_base\)=(-?\d+)", info)
    sym = re.search(r"^([0-9a-f]+) \S+ page_offset_base$", kallsyms, re.M)
    if not m or not sym:
        raise Failure("core.elf has no VMCOREINFO phys_base (qemu_fw_cfg not loaded?) or kallsyms no page_offset_base")
    pa = (int(sym.group(1), 16) - 0xFFFFFFFF80000000 + int(m.group(1))) % (1 << 64)
    loads = [p for p in phdrs if p[0] == 1]
    with core.open("rb") as f:
        seg = next((p for p in loads if p[4] <= pa < p[4] + p[5]), None)
        if seg is None:
            raise Failure(f"page_offset_base at pa {pa:#x} lies in no PT_LOAD of core.elf")
        f.seek(seg[2] + pa - seg[4])
        page_offset, = struct.unpack("<Q", f.read(8))
    data_at = -(-(64 + 56 * (len(loads) + 1) + len(kept)) // 4096) * 4096
    table = [struct.pack("<IIQQQQQQ", 4, 0, 64 + 56 * (len(loads) + 1), 0, 0, len(kept), len(kept), 0)]
    placed = []
    for _, flags, offset, _, paddr, filesz, memsz, align in loads:
        table.append(struct.pack("<IIQQQQQQ", 1, flags or 7, data_at, (page_offset + paddr) % (1 << 64),
                                 paddr, filesz, memsz, 4096))
        placed.append((offset, data_at, filesz))
        data_at += -(-filesz // 4096) * 4096
    with core.open("rb") as src, out.open("wb") as dst:
        # e_phoff 64, no section headers (QEMU writes an empty table first).
        dst.write(head[:32] + struct.pack("<QQIHHHHHH", 64, 0, 0, 64, 56, len(loads) + 1, 0, 0, 0)
                  + b"".join(table) + kept)
        dst.truncate(data_at)
        for offset, at, filesz in placed:
            while filesz:
                done = os.copy_file_range(src.fileno(), dst.fileno(), filesz, offset, at)
                if not done:
                    raise Failure("core.elf ended while copying it into kdump.elf")
                offset, at, filesz = offset + done, at + done, filesz - done


MAKEDUMPFILE = {"makedumpfile-zlib.dump": "-c", "makedumpfile-lzo.dump": "-l",
                "makedumpfile-snappy.dump": "-p", "makedumpfile-zstd.dump": "-z"}


def makedumpfile_formats(stage: Path, config: str, kallsyms: str) -> None:
    """makedumpfile's diskdump files from kdump.elf, dump level 31 (zero,
    cache, user and free pages excluded, as kdump's default does), one per
    compression this makedumpfile was built with."""
    t0 = time.time()
    source = stage / "kdump.elf"
    kdump_elf(stage / "core.elf", kallsyms, source)
    version = subprocess.run(["makedumpfile", "-v"], capture_output=True, text=True)
    built = version.stdout + version.stderr
    for name, flag in MAKEDUMPFILE.items():  # Debian 1.7.2: zlib and lzo
        library = name.split("-")[1].split(".")[0]
        if f"{library}\tdisabled" in built:
            continue
        done = subprocess.run(["makedumpfile", flag, "-d", "31", str(source), str(stage / name)],
                              capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise Failure(f"makedumpfile {flag} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        (stage / name).chmod(0o644)
    say(f"{config}: makedumpfile dumps in {time.time() - t0:.1f} s")


# -- one configuration --------------------------------------------------------------

def start_qemu(config: str, spec: Config, kernel: Kernel, initrd: Path, work: Path) -> tuple[qemu.Run, dict]:
    cpu_model = spec.cpu + (",+la57" if spec.la57 else "")
    append = f"console=ttyS0 panic=-1 {'' if spec.console_log else 'quiet loglevel=4 '}{spec.append}"
    machine = qemu.Machine(cpu_model, MEMORY, CPUS, "tcg")
    extra = []
    if spec.lime_dump and add_lime_disk(extra, work, kernel):
        say(f"{config}: LiME dumps RAM to a virtio disk at boot")
    cmd = qemu.command(kernel.vmlinuz, initrd, append, work, machine, data_port=True, extra=extra)
    say(f"{config}: booting {kernel.package} (-cpu {cpu_model}; {spec.append})")
    return qemu.start(cmd, work), {"cpu_model": cpu_model, "append": append}


def save_walks(config: str, spec: Config, qmp: Qmp, regs: list[str], stage: Path) -> None:
    """QEMU's own page walks of each CPU's CR3: info mem (not on 5-level) and info tlb."""
    for i, text_regs in enumerate(regs):
        (stage / f"cpu{i}.registers.txt").write_text(text_regs)
        mem, tlb, mem_s, tlb_s = qemu.walks(qmp, i, spec.la57)
        if mem is not None:
            (stage / f"cpu{i}.info_mem.txt").write_text(mem)
        (stage / f"cpu{i}.info_tlb.txt").write_text(tlb)
        said = "no info mem (LA57)" if mem is None else f"info mem {mem.count(chr(10))} lines ({mem_s:.1f} s)"
        say(f"{config}: cpu{i}: {said}, info tlb {tlb.count(chr(10))} lines ({tlb_s:.1f} s)")


def dump_core(config: str, qmp: Qmp, stage: Path) -> None:
    size = qemu.dump_core(qmp, stage / "core.elf")
    say(f"{config}: core.elf complete, {size} bytes")


def up_to_date(meta_path: Path) -> bool:
    """meta.json is newer than this builder and the oracle module's source."""
    if not meta_path.exists():
        return False
    sources = [Path(__file__), *ORACLE_SOURCE.iterdir()]
    return meta_path.stat().st_mtime > max(f.stat().st_mtime for f in sources)


def boot(config: str, spec: Config, kernel: Kernel, stage: Path, started: float) -> tuple[dict, dict, list[dict]]:
    """Boot, wait for the guest, freeze it in user mode, save the walks and the core.

    Returns the guest's files, the QEMU run's details and the CPUs' state."""
    deadline = started + CONFIG_TIMEOUT
    with tempfile.TemporaryDirectory(prefix="ptilab-qemu-") as tmp:
        work = Path(tmp)
        initrd = build_initramfs(work, kernel)
        run, run_ = start_qemu(config, spec, kernel, initrd, work)
        qmp = None
        try:
            qmp = Qmp(run.qmp_path, run.qemu, min(started + BOOT_TIMEOUT, deadline))
            text = qemu.wait_for(run, READY, min(started + BOOT_TIMEOUT, deadline), BOOT_TIMEOUT)
            qmp.deadline = deadline
            seen = time.time()
            say(f"{config}: guest ready after {seen - started:.1f} s; console: "
                f"{' '.join(l.strip() for l in text.splitlines() if l.startswith('@@PTILAB-'))}")
            sections = unpack_data(text, run.data)
            check_sections(config, spec, sections)
            if sections["uname"].strip() != kernel.uname:
                raise Failure(f"the guest runs {sections['uname'].strip()}, not {kernel.uname}")
            regs, rounds = qemu.stop_in_user_mode(qmp, CPUS)
            cpus = cpu_state(regs)
            say(f"{config}: stopped {time.time() - seen:.2f} s after the ready marker, {rounds} round(s); "
                f"CPLs {[c['cpl'] for c in cpus]}, CR3s {[hex(c['cr3']) for c in cpus]}")
            save_walks(config, spec, qmp, regs, stage)
            dump_core(config, qmp, stage)
            if spec.dumps:
                dump_formats(qmp, stage, config)
            run_["qemu_version"] = qemu_version(qmp)
            quit_qemu(run.qemu, qmp, max(1.0, deadline - time.time()))
            if (work / "lime.img").exists():
                say(f"{config}: lime.dump holds {lime_from_disk(work / 'lime.img', stage / 'lime.dump')} ranges")
        except subprocess.TimeoutExpired:
            raise Failure("QEMU did not exit after quit") from None
        except BaseException:
            (stage / "core.elf").unlink(missing_ok=True)  # keep the small files of a failed run, not 256 MB
            raise
        finally:
            qemu.reap(run, qmp)
            if run.console.exists():
                (stage / "console.txt").write_text(run.console_text())
    return sections, run_, cpus


def oracle_state(kernel: Kernel, sections: dict[str, str]) -> tuple[bool, str]:
    """Whether the oracle's four files came back, else why not."""
    if kernel.module is None:
        return False, f"module not built: {kernel.module_error}"
    missing = [k for k in ("oracle_user", "oracle_kernel", "oracle_task", "oracle_tasks") if not sections.get(k, "").strip()]
    if missing:
        return False, f"insmod: {sections.get('insmod', '').strip() or 'no output'}; missing {' '.join(missing)}"
    return True, ""


def write_fixture(config: str, spec: Config, kernel: Kernel, stage: Path, out: Path,
                  sections: dict[str, str], run_: dict, cpus: list[dict]) -> dict:
    for key, fname in SECTION_FILES.items():
        if key in sections:
            (stage / fname).write_text(sections[key])
    ptdump = [f for f in ("kernel", "current_user", "current_kernel") if f"ptdump_{f}" in sections]
    oracle, oracle_error = oracle_state(kernel, sections)
    meta = {
        "config": config,
        "release": kernel.release,
        "flavour": kernel.flavour,
        "kernel_release": sections["uname"].strip(),
        "kernel_package": f"{kernel.package} {kernel.version}",
        "vmlinuz": str(kernel.vmlinuz),
        "qemu_version": run_["qemu_version"],
        "append": run_["append"],
        "la57": spec.la57,
        "pti": PTI_ENABLED in sections["dmesg"],
        "kaslr": "nokaslr" not in run_["append"].split(),
        "oracle": oracle,
        "oracle_error": oracle_error,
        "lime": vermagic(kernel.lime) if spec.lime_dump and kernel.lime else None,  # the LiME module lime.dump came from
        "ptdump_available": bool(ptdump),
        "ptdump_files": ptdump,
        "cpu_model": run_["cpu_model"],
        "memory": MEMORY,
        "cpus": cpus,
        "user_cpu": next(c["index"] for c in cpus if c["cpl"] == 3),
    }
    (stage / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    # swap in the new fixture with the old one out of the way for as short a time as possible
    old = out.with_name(f".{config}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    stage.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return meta


def build(config: str, out_root: Path, kernel: Kernel) -> None:
    spec = CONFIGS[config]
    out = out_root / config
    started = time.time()
    stage = out_root / f".{config}.partial"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    sections, run_, cpus = boot(config, spec, kernel, stage, started)
    if spec.dumps:
        makedumpfile_formats(stage, config, sections["kallsyms"])
    meta = write_fixture(config, spec, kernel, stage, out, sections, run_, cpus)
    user_cpu = meta["user_cpu"]
    say(f"{config}: done in {time.time() - started:.0f} s -> {out} (pti {'on' if meta['pti'] else 'off'}, "
        f"user CPU {user_cpu}, CR3 {cpus[user_cpu]['cr3']:#x}, "
        f"oracle {'yes' if meta['oracle'] else 'no: ' + meta['oracle_error']})")


# -- everything ------------------------------------------------------------------------

def build_all(configs: list[str], out_root: Path, cache: Path, jobs: int) -> list[str]:
    """Fetch the kernels, build the modules, boot the configs `jobs` at a time.  Returns the failures."""
    t0 = time.time()
    kernels = prepare_kernels(configs, cache)
    say(f"kernels ready in {time.time() - t0:.1f} s: " + ", ".join(
        f"{k.uname} ({k.version}; oracle {'built' if k.module else 'not built'})"
        for k in kernels.values() if isinstance(k, Kernel)))
    failures = []
    for c in configs:
        kernel = kernels[CONFIGS[c].release, CONFIGS[c].flavour]
        if isinstance(kernel, Failure):
            failures.append(f"{c}: {kernel}")
            print(f"realkernel: error: {c}: {kernel}", file=sys.stderr, flush=True)
    # the slow boots first (5-level: QEMU 7.2's info mem walks nothing for ~20 s per CPU), so two at a time pack well
    order = sorted((c for c in configs if isinstance(kernels[CONFIGS[c].release, CONFIGS[c].flavour], Kernel)),
                   key=lambda c: not CONFIGS[c].la57)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(build, c, out_root, kernels[CONFIGS[c].release, CONFIGS[c].flavour]): c
                   for c in order}
        try:
            for done in concurrent.futures.as_completed(futures):
                try:
                    done.result()
                except (Failure, subprocess.CalledProcessError, OSError) as e:
                    failures.append(f"{futures[done]}: {e}")
                    print(f"realkernel: error: {futures[done]}: {e}", file=sys.stderr, flush=True)
        except BaseException:
            for f in futures:
                f.cancel()
            qemu.kill_all()
            raise
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description="Build the real-kernel fixtures under QEMU.")
    parser.add_argument("--config", action="append", choices=sorted(CONFIGS), help="repeatable; default: all")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--cache", type=Path, help="apt state, .debs, unpacked kernels (default: OUT/.cache)")
    parser.add_argument("--force", action="store_true", help="rebuild even when meta.json is up to date")
    parser.add_argument("--jobs", type=int, default=JOBS, help=f"QEMU boots at once (default {JOBS})")
    args = parser.parse_args()
    # SIGTERM/SIGHUP unwind like Ctrl-C, so the finally blocks kill QEMU.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    out_root = args.out.resolve()
    cache = (args.cache or out_root / ".cache").resolve()
    started = time.time()
    configs = args.config or list(CONFIGS)
    todo = [c for c in configs if args.force or not up_to_date(out_root / c / "meta.json")]
    for c in sorted(set(configs) - set(todo)):
        say(f"{c}: up to date (meta.json is newer than build.py and oracle/), skipped")
    try:
        if not todo:
            return 0
        ensure_packages()
        out_root.mkdir(parents=True, exist_ok=True)
        failures = build_all(todo, out_root, cache, max(1, args.jobs))
    except Failure as e:
        print(f"realkernel: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("realkernel: error: interrupted", file=sys.stderr, flush=True)
        return 130
    except Terminated as e:
        signum = e.args[0]
        print(f"realkernel: error: killed by {signal.Signals(signum).name}", file=sys.stderr, flush=True)
        return 128 + signum
    say(f"{len(todo) - len(failures)} of {len(todo)} configs built in {time.time() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
