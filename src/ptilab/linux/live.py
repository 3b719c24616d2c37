"""The running kernel: its memory through /proc/kcore, and what it says about PTI.

Everything is read under ``root`` (``/`` normally), so a privileged container
can audit its host through the host's /proc and /sys mounted elsewhere, and
tests can hand in a directory of fake files.

What the kernel *says* about page-table isolation, from four places:

- ``/sys/devices/system/cpu/vulnerabilities/meltdown`` (arch/x86/kernel/cpu/bugs.c,
  cpu_show_common()): "Not affected" when the CPU lacks X86_BUG_CPU_MELTDOWN,
  "Mitigation: PTI" when X86_FEATURE_PTI is set, "Unknown (XEN PV detected,
  hypervisor mitigation required)" under Xen PV, else "Vulnerable";
- the ``pti`` flag in /proc/cpuinfo: X86_FEATURE_PTI itself;
- the kernel log: arch/x86/mm/pti.c prints "Kernel/User page tables
  isolation: enabled" from pti_init(), and "disabled on command line." or
  "disabled on XEN PV." (only on an affected CPU) from pti_check_boottime_disable();
- the command line, which asks: ``pti=on|off|auto`` wins, then ``nopti`` or
  ``mitigations=off`` turn it off, else auto (on when the CPU is affected).
"""

from __future__ import annotations

import errno
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ptilab.errors import InputError
from ptilab.linux.exposure import PTI_LOG_PREFIX
from ptilab.memory.kcore import Kcore

MELTDOWN = "sys/devices/system/cpu/vulnerabilities/meltdown"
LOCKDOWN = "sys/kernel/security/lockdown"
CPU_LINE = "smpboot: CPU0: "
MAX_LOG_BYTES = 16 << 20
DUMP_INSTEAD = ("audit a dump of this machine instead (a kdump vmcore, or the hypervisor's: "
                "QEMU dump-guest-memory, virsh dump)")


@dataclass(frozen=True)
class Claims:
    """What the running kernel reports about PTI; None where a source could not be read.

    meltdown: the vulnerabilities/meltdown line.
    pti_flag: whether /proc/cpuinfo's flags include ``pti``.
    log: the kernel log's "Kernel/User page tables isolation:" messages, in order.
    cmdline: /proc/cmdline.
    cpu_bugs: /proc/cpuinfo's first ``bugs`` line ("bugs: cpu_meltdown spectre_v1 ...").
    cpu_line: the log's "smpboot: CPU0: ..." line, naming the CPU.
    """

    meltdown: str | None
    pti_flag: bool | None
    log: tuple[str, ...] | None
    cmdline: str | None
    cpu_bugs: str | None = None
    cpu_line: str | None = None

    def says_pti(self) -> dict[str, bool | None]:
        """Per source, whether it says PTI is on (True), off (False), or nothing about it (None)."""
        sysfs = None
        if self.meltdown == "Mitigation: PTI":
            sysfs = True
        elif self.meltdown is not None and (self.meltdown == "Vulnerable" or self.meltdown.startswith("Unknown")):
            sysfs = False
        log = None
        if self.log:
            log = self.log[-1] == "enabled"
            if not log and not self.log[-1].startswith("disabled"):
                log = None
        return {"vulnerabilities/meltdown": sysfs, "cpuinfo pti flag": self.pti_flag, "kernel log": log}

    @property
    def requested(self) -> str | None:
        """What the command line asks for: 'on', 'off' or 'auto'; None if unread."""
        return None if self.cmdline is None else pti_requested(self.cmdline)

    def as_dict(self) -> dict:
        return {**asdict(self), "log": None if self.log is None else list(self.log),
                "says_pti": self.says_pti(), "requested": self.requested}


def pti_requested(cmdline: str) -> str:
    """PTI's mode as pti_check_boottime_disable() reads the command line:
    ``pti=`` first, then ``nopti`` or ``mitigations=off``; else auto."""
    words = cmdline.split()
    if "--" in words:  # what follows goes to init, not the kernel
        words = words[:words.index("--")]
    pti = [w[4:] for w in words if w.startswith("pti=")]
    if pti and pti[-1] in ("on", "off", "auto"):
        return pti[-1]
    mitigations = [w[12:] for w in words if w.startswith("mitigations=")]
    if "nopti" in words or (mitigations and mitigations[-1].split(",")[0] == "off"):
        return "off"
    return "auto"


def read_claims(root: Path = Path("/")) -> Claims:
    """Read the four sources under root; an unreadable one is None, never an error."""
    meltdown = _read_text(root / MELTDOWN)
    cpuinfo = _read_text(root / "proc/cpuinfo")
    pti_flag, bugs = None, None
    if cpuinfo is not None:
        flags = [line.partition(":")[2].split() for line in cpuinfo.splitlines() if line.startswith("flags")]
        pti_flag = ("pti" in flags[0]) if flags else None
        bugs = next((" ".join(line.split()) for line in cpuinfo.splitlines() if line.startswith("bugs")), None)
    lines = read_log(root)
    pti_log = None if lines is None else tuple(
        line.partition(PTI_LOG_PREFIX)[2].strip() for line in lines if PTI_LOG_PREFIX in line)
    cpu_line = None if lines is None else next((line.strip() for line in lines if CPU_LINE in line), None)
    return Claims(meltdown.strip() if meltdown is not None else None, pti_flag, pti_log,
                  (_read_text(root / "proc/cmdline") or "").strip() or None, bugs,
                  cpu_line[cpu_line.index(CPU_LINE):] if cpu_line else None)


def read_log(root: Path = Path("/")) -> list[str] | None:
    """The kernel log's texts (/dev/kmsg: records "prio,seq,usec,flags;text"),
    or None when the log cannot be read. A log that has wrapped since boot may hold no early line."""
    try:
        fd = os.open(root / "dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    chunks, total = [], 0
    try:
        while total < MAX_LOG_BYTES:
            try:
                chunk = os.read(fd, 8192)  # one record per read from /dev/kmsg, all of a plain file
            except BlockingIOError:
                break  # the end of the log
            except OSError as ex:
                if ex.errno == errno.EPIPE:
                    continue  # a record was overwritten while reading: go on with the next
                return None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    lines = b"".join(chunks).decode("utf-8", "replace").splitlines()
    return [line.partition(";")[2] for line in lines if ";" in line]


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


# -- /proc/kcore, or why not -------------------------------------------------------

def open_kcore(root: Path = Path("/")) -> Kcore:
    """Open root/proc/kcore; when that is impossible, an InputError saying why
    (no procfs, no kcore in this kernel or container, not root, lockdown) and
    what would work instead."""
    proc = root / "proc"
    path = proc / "kcore"
    if not _exists(proc / "self") and not _exists(proc / "version"):
        raise InputError(f"{proc} is not a mounted procfs: mount -t proc proc {proc}, "
                         f"or give --live ROOT where this machine's /proc and /sys are mounted")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputError(f"{path} does not exist: {_why_no_kcore(root)}; {DUMP_INSTEAD}") from None
    except PermissionError:
        raise InputError(f"{path}: {_why_denied(root)}") from None
    except OSError as ex:
        raise InputError(f"{path}: cannot open: {ex.strerror or ex}; {DUMP_INSTEAD}") from None
    kcore = Kcore(path, fd)
    if not kcore.vmcoreinfo_text:
        kcore.close()
        raise InputError(f"{path} has no VMCOREINFO note (Linux 4.19 added it), so ptilab cannot find "
                         f"init_top_pgt and phys_base; {DUMP_INSTEAD}")
    return kcore


def _exists(path: Path) -> bool:
    """Whether path exists; one we may not even look at (not root) is taken to."""
    try:
        path.stat()
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _why_denied(root: Path) -> str:
    if os.geteuid() != 0:
        return ("only root may read it (the kernel also wants CAP_SYS_RAWIO): run ptilab as root, "
                f"e.g. sudo ptilab audit --live, or {DUMP_INSTEAD}")
    lockdown = _read_text(root / LOCKDOWN)
    if lockdown and "[confidentiality]" in lockdown:
        return (f"kernel lockdown is in confidentiality mode ({root / LOCKDOWN}), which forbids /proc/kcore "
                f"(LOCKDOWN_KCORE; UEFI Secure Boot or lockdown= turns it on, and only a reboot turns it "
                f"off); {DUMP_INSTEAD}")
    return ("permission denied although root: CAP_SYS_RAWIO is missing (a container without it?) or a "
            f"security module (SELinux, AppArmor) refuses it; {DUMP_INSTEAD}")


def _why_no_kcore(root: Path) -> str:
    """What is known first (this kernel offers no kcore), then the likeliest why."""
    config = _kcore_config(root)
    if config:
        return f"this kernel has no kcore: {config}"
    container = _container(root)
    if container:
        return (f"the kernel offers no kcore in this /proc, either built without CONFIG_PROC_KCORE (as microVM "
                f"kernels are) or hidden from a container, which this looks like ({container}): run ptilab on the host")
    return ("this kernel offers no kcore: it was likely built without CONFIG_PROC_KCORE, as microVM kernels "
            "(Firecracker's) and some hardened ones are")


def _kcore_config(root: Path) -> str | None:
    """What the running kernel's own config says of CONFIG_PROC_KCORE, where it
    says it was left out (/proc/config.gz with CONFIG_IKCONFIG_PROC, or the
    distribution's /boot/config-RELEASE)."""
    import gzip

    release = (_read_text(root / "proc/sys/kernel/osrelease") or "").strip()
    sources = [root / "proc/config.gz", *([root / "boot" / f"config-{release}"] if release else [])]
    for source in sources:
        try:
            text = (gzip.decompress(source.read_bytes()) if source.suffix == ".gz" else source.read_bytes()).decode(
                errors="replace")
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
        if "# CONFIG_PROC_KCORE is not set" in text:
            return f"{source} says CONFIG_PROC_KCORE is not set"
    return None


def _container(root: Path) -> str | None:
    """A sign that root is a container's, or None."""
    for marker in (".dockerenv", "run/.containerenv"):
        if (root / marker).exists():
            return f"/{marker} exists"
    environ = _read_text(root / "proc/1/environ") or ""
    for var in environ.split("\0"):
        if var.startswith("container="):
            return f"PID 1 has {var}"
    cgroup = _read_text(root / "proc/1/cgroup") or ""
    for word in ("docker", "kubepods", "containerd", "libpod", "lxc"):
        if word in cgroup:
            return f"PID 1's cgroup names {word}"
    return None
