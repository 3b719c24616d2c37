"""Build real-kernel fixtures: Debian's Linux booted under QEMU, stopped with a CPU in user mode.

For each configuration this installs what it needs (Debian's qemu-system-x86,
linux-image-amd64, busybox-static, cpio), boots the kernel with a tiny busybox
initramfs under TCG, lets one busy loop per CPU put the CPUs in user mode,
stops the VM when at least one CPU is at CPL 3 and saves, through QEMU's
monitor (QMP, with HMP commands sent through human-monitor-command):

  core.elf                      dump-guest-memory, no paging, no compression
                                (ELF core, PT_LOAD = guest physical ranges)
  cpu<N>.registers.txt          HMP `info registers` of CPU N
  cpu<N>.info_mem.txt           HMP `info mem` of CPU N (QEMU's walk of its CR3)
  cpu<N>.info_tlb.txt           HMP `info tlb` of CPU N (the same, page by page)
  kallsyms.txt dmesg.txt cpuinfo.txt console.txt
  ptdump_{kernel,current_user,current_kernel}.txt   when the kernel has PTDUMP_DEBUGFS
  meta.json                     versions, command line, CR3/CR4/EFER/CPL/RIP per CPU,
                                which CPU is in user mode

Every core carries the guest's VMCOREINFO note (QEMU's vmcoreinfo device, fed
by the qemu_fw_cfg module the initramfs loads). One configuration (pti-kaslr)
also saves the same memory as users hold it (about 3 s more):

  kdump-zlib.dump               dump-guest-memory -z (and kdump-lzo/-snappy/-zstd where QEMU has them)
  kdump.elf                     core.elf as kdump's vmcore: NT_PRSTATUS + VMCOREINFO notes, no CR3
  makedumpfile-{zlib,lzo}.dump  makedumpfile -c / -l -d 31 of kdump.elf (Debian's build lacks snappy, zstd)
  lime.dump                     Debian's LiME (lime-forensics-dkms, built by DKMS for the fixture kernel)
                                run in the guest at boot, writing to a virtio disk: an earlier moment
                                than the other dumps of the same boot

The guest sends its files as a gzip'd tar on a second serial port (a host
file, which QEMU writes synchronously) and announces the byte count on the
console before its ready marker; the host checks the count and unpacks.

Usage: python tests/realkernel/build.py [--config NAME ...] [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import glob
import gzip
import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGES = ["qemu-system-x86", "linux-image-amd64", "busybox-static", "cpio", "makedumpfile"]
CONFIGS = {
    "pti-4level": {"append": "pti=on nokaslr", "la57": False, "pti": True},
    "pti-5level": {"append": "pti=on nokaslr", "la57": True, "pti": True},
    "pti-off": {"append": "pti=off nokaslr", "la57": False, "pti": False},
    "pti-kaslr": {"append": "pti=on", "la57": False, "pti": True, "dumps": True},
}
CPUS = 2
MEMORY = "256M"
BOOT_TIMEOUT = 120      # QEMU start -> guest ready marker
CONFIG_TIMEOUT = 240    # everything for one configuration
USER_MODE_TRIES = 200   # stop / look / cont rounds before giving up
PTI_ENABLED = "Kernel/User page tables isolation: enabled"
READY = "@@PTILAB-READY"
SECTION_FILES = {
    "kallsyms": "kallsyms.txt",
    "dmesg": "dmesg.txt",
    "cpuinfo": "cpuinfo.txt",
    "ptdump_kernel": "ptdump_kernel.txt",
    "ptdump_current_user": "ptdump_current_user.txt",
    "ptdump_current_kernel": "ptdump_current_kernel.txt",
}

# Runs as PID 1 in the guest.  The console (ttyS0) gets progress markers; the
# files go as one gzip'd tar on the data port (ttyS1, a host file) put in raw
# mode, and their byte count is printed on the console so the host can check it
# has them all.  (Plain text on a serial port runs at ~220 KB/s under TCG here:
# 18 s for kallsyms alone; gzip -1 makes it ~5 times smaller.)
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
insmod /lib/qemu_fw_cfg.ko 2>/dev/null  # hands the kernel's VMCOREINFO to QEMU's vmcoreinfo device
exec </dev/console >/dev/console 2>&1
echo "@@PTILAB-BOOTED $(uname -r) uptime $(cut -d' ' -f1 /proc/uptime)"
if [ -r /lib/lime.ko ] && grep -qs 0x1af4 /sys/bus/pci/devices/*/vendor; then
  # a virtio disk is attached: LiME dumps RAM onto it (format=lime, no page skipped)
  for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    insmod /lib/$m.ko
  done
  i=0
  while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  insmod /lib/lime.ko "path=/dev/vda format=lime timeout=0" && echo "@@PTILAB-LIME uptime $(cut -d' ' -f1 /proc/uptime)"
fi
echo 0 > /proc/sys/kernel/kptr_restrict
echo 0 > /proc/sys/kernel/dmesg_restrict
mkdir -p /tmp/out
cd /tmp/out
uname -r > uname
cat /proc/cmdline > cmdline
cat /proc/kallsyms > kallsyms
dmesg > dmesg
cat /proc/cpuinfo > cpuinfo
ls /sys/kernel/debug/page_tables > ptdump_ls 2>/dev/null
for f in kernel current_user current_kernel; do
  [ -r /sys/kernel/debug/page_tables/$f ] && cat /sys/kernel/debug/page_tables/$f > ptdump_$f
done
tar -cf - * | gzip -1 > /tmp/out.tgz
stty -F /dev/ttyS1 raw -echo
cat /tmp/out.tgz > /dev/ttyS1
echo "@@PTILAB-DATA $(wc -c < /tmp/out.tgz) bytes, uptime $(cut -d' ' -f1 /proc/uptime)"
n=$(nproc)
i=0
while [ $i -lt $n ]; do
  if command -v taskset >/dev/null; then
    taskset -c $i sh -c 'while :; do :; done' &
  else
    sh -c 'while :; do :; done' &
  fi
  i=$((i + 1))
done
echo "@@PTILAB-READY $n busy loops, uptime $(cut -d' ' -f1 /proc/uptime)"
while :; do sleep 1000; done
"""


class Failure(Exception):
    """One-line reason the build failed."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP: unwind (killing QEMU on the way) and exit."""


def _terminate(signum, _frame):
    raise Terminated(signum)


def say(msg: str) -> None:
    print(f"realkernel: {msg}", flush=True)


# -- host setup ----------------------------------------------------------------

def installed(package: str) -> bool:
    done = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return done.returncode == 0 and done.stdout.strip() == "install ok installed"


def ensure_packages() -> None:
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
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        except subprocess.TimeoutExpired:
            raise Failure(f"{' '.join(cmd)} timed out") from None
        if done.returncode:
            last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or [f"exit {done.returncode}"]
            raise Failure(f"{' '.join(cmd)} failed: {last[0]}")
    still = [p for p in missing if not installed(p)]
    if still:
        raise Failure(f"apt-get did not install {' '.join(still)}")


def kernel_image() -> Path:
    """The vmlinuz that linux-image-amd64 currently depends on (else the newest one)."""
    depends = subprocess.run(["dpkg-query", "-W", "-f=${Depends}", "linux-image-amd64"],
                             capture_output=True, text=True).stdout
    m = re.search(r"linux-image-(\S+?)(?:-unsigned)?\s*(?:\(|,|$)", depends)
    if m and Path(f"/boot/vmlinuz-{m.group(1)}").exists():
        return Path(f"/boot/vmlinuz-{m.group(1)}")
    images = sorted(glob.glob("/boot/vmlinuz-*"),
                    key=lambda p: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", p)])
    if not images:
        raise Failure("no /boot/vmlinuz-* after installing linux-image-amd64")
    return Path(images[-1])


def build_initramfs(work: Path, vmlinuz: Path) -> Path:
    root = work / "root"
    for d in ("bin", "dev", "proc", "sys", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        raise Failure("/bin/busybox missing although busybox-static is installed")
    shutil.copy(busybox, root / "bin" / "busybox")
    add_fw_cfg_module(root / "lib", vmlinuz)
    add_lime_modules(root / "lib", vmlinuz)
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    try:
        os.mknod(root / "dev" / "console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))
    except OSError:
        pass  # not root: the kernel's built-in initramfs already has /dev/console
    files = subprocess.run(["find", "."], cwd=root, capture_output=True, text=True, check=True).stdout
    archive = subprocess.run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], cwd=root,
                             input=files.encode(), capture_output=True, check=True).stdout
    out = work / "initramfs.cpio.gz"
    out.write_bytes(gzip.compress(archive))
    return out


# -- QEMU monitor ----------------------------------------------------------------

class Qmp:
    """QEMU Machine Protocol over a unix socket, every read bounded by a deadline."""

    def __init__(self, path: Path, qemu: subprocess.Popen, deadline: float):
        self.deadline = deadline
        self.buf = b""
        while True:
            self.sock = socket.socket(socket.AF_UNIX)
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if qemu.poll() is not None:
                    raise Failure(f"QEMU exited (code {qemu.returncode}) before its monitor socket appeared")
                if time.time() > deadline:
                    raise Failure("QEMU's monitor socket never appeared")
                time.sleep(0.1)
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        while b"\n" not in self.buf:
            left = self.deadline - time.time()
            if left <= 0:
                raise Failure("timed out waiting for QEMU's monitor")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                raise Failure("timed out waiting for QEMU's monitor") from None
            if not chunk:
                raise Failure("QEMU closed its monitor socket")
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
                raise Failure(f"monitor command {command} failed: {reply['error'].get('desc')}")
            # anything else is an asynchronous event (STOP, RESUME, DUMP_COMPLETED...): skip it

    def hmp(self, line: str, cpu: int | None = None) -> str:
        """An HMP command; cpu-index selects the CPU like `cpu N` does."""
        args: dict = {"command-line": line}
        if cpu is not None:
            args["cpu-index"] = cpu
        # HMP answers end lines with CRLF; the fixtures keep plain LF.
        return str(self.execute("human-monitor-command", **args)).replace("\r\n", "\n")

    def close(self) -> None:
        self.sock.close()


def register(text: str, name: str) -> int:
    m = re.search(rf"(?<![A-Za-z0-9]){name}=([0-9a-fA-F]+)", text)
    if not m:
        raise Failure(f"no {name}= in QEMU's info registers")
    return int(m.group(1), 16)


def check_core(path: Path) -> int:
    """The ELF core is whole: every PT_LOAD's bytes are in the file.  Returns its size."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            raise Failure(f"{path.name} is not a little-endian ELF64 file")
        e_type, = struct.unpack_from("<H", head, 16)
        e_phoff, = struct.unpack_from("<Q", head, 32)
        e_phentsize, e_phnum = struct.unpack_from("<HH", head, 54)
        if e_type != 4 or e_phnum == 0:
            raise Failure(f"{path.name} is not an ELF core with program headers")
        f.seek(e_phoff)
        table = f.read(e_phentsize * e_phnum)
    end = 0
    loads = 0
    for i in range(e_phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", table, i * e_phentsize)
        end = max(end, p_offset + p_filesz)
        loads += p_type == 1
    if not loads or end > size:
        raise Failure(f"{path.name} is truncated: {size} bytes, program headers need {end}")
    return size


def unpack_data(console_text: str, data: Path) -> dict[str, str]:
    """The guest's files, from the gzip'd tar on the data port, checked against the size it announced."""
    m = re.search(r"@@PTILAB-DATA (\d+) bytes", console_text)
    if not m:
        raise Failure("the guest announced no data on its console")
    want = int(m.group(1))
    give_up = time.time() + 10  # the UART may still be draining its last bytes
    while (data.stat().st_size if data.exists() else 0) < want and time.time() < give_up:
        time.sleep(0.1)
    blob = data.read_bytes() if data.exists() else b""
    if len(blob) != want:
        raise Failure(f"data port holds {len(blob)} bytes, the guest sent {m.group(1)}")
    try:
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
            return {member.name.removeprefix("./"): tar.extractfile(member).read().decode(errors="replace")
                    for member in tar.getmembers() if member.isfile()}
    except (OSError, EOFError, tarfile.TarError) as e:
        raise Failure(f"the guest's data does not unpack: {e}") from None


def check_sections(config: str, spec: dict, sections: dict[str, str]) -> None:
    for name in ("uname", "kallsyms", "dmesg", "cpuinfo"):
        if not sections.get(name, "").strip():
            raise Failure(f"the guest sent no {name}")
    symbols = sections["kallsyms"].splitlines()
    if len(symbols) < 10000 or all(s.startswith("0000000000000000") for s in symbols[:100]):
        raise Failure(f"kallsyms looks restricted or short ({len(symbols)} lines)")
    if spec["pti"] != (PTI_ENABLED in sections["dmesg"]):
        raise Failure(f"dmesg {'lacks' if spec['pti'] else 'has'} '{PTI_ENABLED}' on {config}")
    flags = " ".join(l for l in sections["cpuinfo"].splitlines() if l.startswith("flags"))
    if spec["la57"] != (" la57" in flags):
        raise Failure(f"guest cpuinfo flags {'lack' if spec['la57'] else 'have'} la57 on {config}")


# -- the same memory in the formats users hold ---------------------------------------

def add_fw_cfg_module(lib: Path, vmlinuz: Path) -> None:
    """qemu_fw_cfg.ko of vmlinuz's release, for the initramfs: loaded, it hands
    the kernel's VMCOREINFO to QEMU's vmcoreinfo device, and QEMU then writes
    it into every dump (a module on Debian, built in elsewhere)."""
    release = vmlinuz.name.removeprefix("vmlinuz-")
    module = Path(f"/lib/modules/{release}/kernel/drivers/firmware/qemu_fw_cfg.ko")
    if module.exists():
        lib.mkdir(parents=True, exist_ok=True)
        shutil.copy(module, lib / module.name)


LIME_PACKAGES = ["lime-forensics-dkms"]  # plus linux-headers-RELEASE, which DKMS builds it against
VIRTIO_BLK = ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "virtio_blk"]


def ensure_lime(vmlinuz: Path) -> None:
    """Debian's LiME (lime-forensics-dkms), built by DKMS for vmlinuz's release."""
    release = vmlinuz.name.removeprefix("vmlinuz-")
    packages = LIME_PACKAGES + [f"linux-headers-{release}"]
    if all(installed(p) for p in packages) and lime_module(release).exists():
        return
    t0 = time.time()
    apt_install(packages)
    if not lime_module(release).exists():
        raise Failure(f"lime-forensics-dkms installed but DKMS built no {lime_module(release)}")
    say(f"LiME built for {release} in {time.time() - t0:.0f} s")


def lime_module(release: str) -> Path:
    return Path(f"/lib/modules/{release}/updates/dkms/lime.ko")


def add_lime_modules(lib: Path, vmlinuz: Path) -> None:
    """lime.ko and the virtio-blk driver it writes through, when LiME was built."""
    release = vmlinuz.name.removeprefix("vmlinuz-")
    if not lime_module(release).exists():
        return
    lib.mkdir(parents=True, exist_ok=True)
    shutil.copy(lime_module(release), lib / "lime.ko")
    for name in VIRTIO_BLK:
        found = glob.glob(f"/lib/modules/{release}/kernel/drivers/*/{name}.ko")
        if not found:
            raise Failure(f"no {name}.ko for {release}: LiME would have no disk to write to")
        shutil.copy(found[0], lib / f"{name}.ko")


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


def add_lime_disk(cmd: list[str], work: Path) -> bool:
    """A sparse virtio disk the size of RAM and more, for LiME to write to (if LiME is in the initramfs)."""
    release = Path(cmd[cmd.index("-kernel") + 1]).name.removeprefix("vmlinuz-")
    if not lime_module(release).exists():
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

def build(config: str, out_root: Path, vmlinuz: Path, initrd: Path, force: bool) -> None:
    spec = CONFIGS[config]
    out = out_root / config
    meta_path = out / "meta.json"
    if not force and meta_path.exists() and meta_path.stat().st_mtime > Path(__file__).stat().st_mtime:
        say(f"{config}: up to date ({meta_path} is newer than build.py), skipped")
        return
    started = time.time()
    config_deadline = started + CONFIG_TIMEOUT
    out_root.mkdir(parents=True, exist_ok=True)
    stage = out_root / f".{config}.partial"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    with tempfile.TemporaryDirectory(prefix="ptilab-qemu-") as tmp:
        work = Path(tmp)
        console, data, qmp_path = work / "console.log", work / "data.tgz", work / "qmp.sock"
        errors = work / "qemu.stderr"
        cpu_model = "qemu64,vendor=GenuineIntel" + (",+la57" if spec["la57"] else "")
        append = f"console=ttyS0 panic=-1 quiet loglevel=4 {spec['append']}"
        cmd = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", cpu_model,
               "-m", MEMORY, "-smp", str(CPUS), "-kernel", str(vmlinuz), "-initrd", str(initrd),
               "-append", append, "-device", "vmcoreinfo", "-display", "none", "-vga", "none", "-nic", "none", "-no-reboot",
               "-serial", f"file:{console}", "-serial", f"file:{data}",
               "-qmp", f"unix:{qmp_path},server=on,wait=off"]
        if spec.get("dumps") and add_lime_disk(cmd, work):
            say(f"{config}: LiME dumps RAM to a virtio disk at boot")
        say(f"{config}: booting {vmlinuz} (-cpu {cpu_model}; {spec['append']})")
        with errors.open("wb") as err_file:
            qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err_file, start_new_session=True)
        qmp = None
        try:
            boot_deadline = min(started + BOOT_TIMEOUT, config_deadline)
            qmp = Qmp(qmp_path, qemu, boot_deadline)
            qmp.deadline = config_deadline
            text = ""
            while READY not in text:
                if qemu.poll() is not None:
                    err = errors.read_text(errors="replace").strip().splitlines()[-1:]
                    panic = [l for l in text.splitlines() if "Kernel panic" in l][-1:]
                    raise Failure(f"QEMU exited (code {qemu.returncode}) before the guest was ready: "
                                  f"{(panic or err or ['no message'])[0].strip()}")
                if time.time() > boot_deadline:
                    raise Failure(f"the guest printed no ready marker in {BOOT_TIMEOUT} s "
                                  f"(console ends: {text.strip().splitlines()[-1:]})")
                time.sleep(0.25)
                text = console.read_text(errors="replace") if console.exists() else ""
            say(f"{config}: guest ready after {time.time() - started:.1f} s")
            say(f"{config}: console: {' '.join(l.strip() for l in text.splitlines() if l.startswith('@@PTILAB-'))}")
            sections = unpack_data(text, data)
            check_sections(config, spec, sections)
            time.sleep(1)  # let the busy loops get going

            regs: list[str] = []
            for attempt in range(USER_MODE_TRIES):
                qmp.execute("stop")
                regs = [qmp.hmp("info registers", cpu=i) for i in range(CPUS)]
                if any(register(r, "CPL") == 3 for r in regs):
                    break
                qmp.execute("cont")
                time.sleep(0.02 + 0.01 * (attempt % 10))
            else:
                raise Failure(f"no CPU was at CPL 3 in {USER_MODE_TRIES} stop/cont rounds")
            cpus = []
            for i, text_regs in enumerate(regs):
                cpus.append({"index": i, "cr3": register(text_regs, "CR3"), "cr4": register(text_regs, "CR4"),
                             "efer": register(text_regs, "EFER"), "cpl": register(text_regs, "CPL"),
                             "rip": register(text_regs, "RIP")})
            user_cpu = next(c["index"] for c in cpus if c["cpl"] == 3)
            say(f"{config}: stopped after {attempt + 1} round(s); CPLs "
                f"{[c['cpl'] for c in cpus]}, CR3s {[hex(c['cr3']) for c in cpus]}")
            for i, text_regs in enumerate(regs):
                (stage / f"cpu{i}.registers.txt").write_text(text_regs)
                t0 = time.time()
                mem = qmp.hmp("info mem", cpu=i)
                t1 = time.time()
                tlb = qmp.hmp("info tlb", cpu=i)
                t2 = time.time()
                (stage / f"cpu{i}.info_mem.txt").write_text(mem)
                (stage / f"cpu{i}.info_tlb.txt").write_text(tlb)
                say(f"{config}: cpu{i}: info mem {mem.count(chr(10))} lines ({t1 - t0:.1f} s), "
                    f"info tlb {tlb.count(chr(10))} lines ({t2 - t1:.1f} s)")

            core = stage / "core.elf"
            say(f"{config}: dump-guest-memory {core.name}")
            qmp.execute("dump-guest-memory", paging=False, protocol=f"file:{core}")  # synchronous
            status = qmp.execute("query-dump")
            if not isinstance(status, dict) or status.get("status") != "completed":
                raise Failure(f"dump-guest-memory did not complete: {status}")
            size = check_core(core)
            core.chmod(0o644)
            say(f"{config}: core.elf complete, {size} bytes")
            if spec.get("dumps"):
                dump_formats(qmp, stage, config)
            version = qmp.execute("query-version")
            qemu_version = "{major}.{minor}.{micro}".format(**version["qemu"])
            if version.get("package"):
                qemu_version += f" ({version['package'].strip()})"
            try:
                qmp.execute("quit")
            except Failure:
                pass  # QEMU may close the socket before answering
            qemu.wait(timeout=max(1.0, config_deadline - time.time()))
            if (work / "lime.img").exists():
                say(f"{config}: lime.dump holds {lime_from_disk(work / 'lime.img', stage / 'lime.dump')} ranges")
        except subprocess.TimeoutExpired:
            raise Failure("QEMU did not exit after quit") from None
        except BaseException:
            (stage / "core.elf").unlink(missing_ok=True)  # keep the small files of a failed run, not 256 MB
            raise
        finally:
            if qmp is not None:
                qmp.close()
            if qemu.poll() is None:
                qemu.kill()
                qemu.wait()
            if console.exists():
                (stage / "console.txt").write_text(console.read_text(errors="replace"))
    if spec.get("dumps"):
        makedumpfile_formats(stage, config, sections["kallsyms"])
    for key, fname in SECTION_FILES.items():
        if key in sections:
            (stage / fname).write_text(sections[key])
    ptdump = [f for f in ("kernel", "current_user", "current_kernel") if f"ptdump_{f}" in sections]
    meta = {
        "config": config,
        "kernel_release": sections["uname"].strip(),
        "vmlinuz": str(vmlinuz),
        "qemu_version": qemu_version,
        "append": append,
        "la57": spec["la57"],
        "pti": PTI_ENABLED in sections["dmesg"],
        "kaslr": "nokaslr" not in append.split(),
        "ptdump_available": bool(ptdump),
        "ptdump_files": ptdump,
        "cpu_model": cpu_model,
        "memory": MEMORY,
        "cpus": cpus,
        "user_cpu": user_cpu,
    }
    (stage / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    stage.rename(out)
    say(f"{config}: done in {time.time() - started:.0f} s -> {out} (pti {'on' if meta['pti'] else 'off'}, "
        f"user CPU {user_cpu}, CR3 {cpus[user_cpu]['cr3']:#x}, ptdump {'yes' if ptdump else 'no'})")


def main() -> int:
    parser = argparse.ArgumentParser(description="Build the real-kernel fixtures under QEMU.")
    parser.add_argument("--config", action="append", choices=sorted(CONFIGS), help="repeatable; default: all")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--force", action="store_true", help="rebuild even when meta.json is up to date")
    args = parser.parse_args()
    # SIGTERM/SIGHUP unwind like Ctrl-C, so the finally blocks kill QEMU.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    step = "setup"
    try:
        ensure_packages()
        vmlinuz = kernel_image()
        if not os.access(vmlinuz, os.R_OK):
            raise Failure(f"{vmlinuz} is not readable (Debian makes it 0600: run as root)")
        if any(CONFIGS[c].get("dumps") for c in args.config or CONFIGS):
            ensure_lime(vmlinuz)
        with tempfile.TemporaryDirectory(prefix="ptilab-initrd-") as tmp:
            initrd = build_initramfs(Path(tmp), vmlinuz)
            say(f"initramfs {initrd.stat().st_size} bytes (busybox + /init)")
            for config in args.config or list(CONFIGS):
                step = config
                build(config, args.out.resolve(), vmlinuz, initrd, args.force)
    except Failure as e:
        print(f"realkernel: error: {step}: {e}", file=sys.stderr, flush=True)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"realkernel: error: {step}: {' '.join(map(str, e.cmd))} failed with {e.returncode}",
              file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"realkernel: error: {step}: interrupted", file=sys.stderr, flush=True)
        return 130
    except Terminated as e:
        signum = e.args[0]
        print(f"realkernel: error: {step}: killed by {signal.Signals(signum).name}", file=sys.stderr, flush=True)
        return 128 + signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
