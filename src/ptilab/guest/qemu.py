"""QEMU running a guest: started with its serial ports on host files and QMP
on a unix socket, every wait bounded by a deadline, and killed on every way
out (an error, Ctrl-C, SIGTERM turned into an exception by the caller).

HMP commands go through QMP's human-monitor-command with cpu-index (as `cpu N`
then the command, with JSON framing and no prompt to parse).
"""

from __future__ import annotations

import json
import re
import socket
import struct
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ptilab.guest import GuestError

QEMU = "qemu-system-x86_64"
USER_MODE_TRIES = 200   # stop / look / cont rounds before giving up
PANIC = "Kernel panic"

_running: set[subprocess.Popen] = set()   # every QEMU started here and not yet reaped
_running_lock = threading.Lock()


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
                    raise GuestError(f"QEMU exited (code {qemu.returncode}) before its monitor socket appeared")
                if time.time() > deadline:
                    raise GuestError("QEMU's monitor socket never appeared")
                time.sleep(0.1)
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        while b"\n" not in self.buf:
            left = self.deadline - time.time()
            if left <= 0:
                raise GuestError("timed out waiting for QEMU's monitor")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                raise GuestError("timed out waiting for QEMU's monitor") from None
            if not chunk:
                raise GuestError("QEMU closed its monitor socket")
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
                raise GuestError(f"monitor command {command} failed: {reply['error'].get('desc')}")
            # anything else is an asynchronous event (STOP, RESUME, DUMP_COMPLETED...): skip it

    def hmp(self, line: str, cpu: int | None = None) -> str:
        """An HMP command; cpu-index selects the CPU like `cpu N` does."""
        args: dict = {"command-line": line}
        if cpu is not None:
            args["cpu-index"] = cpu
        # HMP answers end lines with CRLF; the files keep plain LF.
        return str(self.execute("human-monitor-command", **args)).replace("\r\n", "\n")

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True)
class Machine:
    """What QEMU emulates: the -cpu model, memory, CPU count, accelerator."""
    cpu: str = "qemu64,vendor=GenuineIntel"
    memory: str = "256M"
    smp: int = 2
    accel: str = "tcg"


@dataclass
class Run:
    """One QEMU process and the host files of its ports."""
    qemu: subprocess.Popen
    console: Path
    errors: Path
    qmp_path: Path
    data: Path | None = None

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""


def command(vmlinuz: Path, initrd: Path, append: str, work: Path, machine: Machine,
            data_port: bool = False, extra: list[str] = ()) -> list[str]:
    """QEMU's command line: q35, no display, no network, no reboot (a panic with
    panic=-1 ends QEMU), the console on work/console.log, QMP on work/qmp.sock."""
    cmd = [QEMU, "-machine", "q35", "-accel", machine.accel, "-cpu", machine.cpu,
           "-m", machine.memory, "-smp", str(machine.smp), "-kernel", str(vmlinuz), "-initrd", str(initrd),
           "-append", append, "-device", "vmcoreinfo", "-display", "none", "-vga", "none", "-nic", "none",
           "-no-reboot", "-serial", f"file:{work / 'console.log'}"]
    if data_port:
        cmd += ["-serial", f"file:{work / 'data.tgz'}"]
    return cmd + ["-qmp", f"unix:{work / 'qmp.sock'},server=on,wait=off", *extra]


def start(cmd: list[str], work: Path) -> Run:
    """Start QEMU in a session of its own (a Ctrl-C on the terminal reaches
    ptilab, which kills it, not QEMU half-way through a dump)."""
    errors = work / "qemu.stderr"
    try:
        with errors.open("wb") as err_file:
            qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err_file, start_new_session=True)
    except FileNotFoundError:
        raise GuestError(f"{cmd[0]} not found: apt-get install qemu-system-x86") from None
    with _running_lock:
        _running.add(qemu)
    data = next((Path(a.removeprefix("file:")) for a in cmd if a.endswith("data.tgz")), None)
    return Run(qemu, work / "console.log", errors, work / "qmp.sock", data)


def reap(run: Run, qmp: Qmp | None) -> None:
    """Close the monitor and kill QEMU if it still runs (a run that failed half-way)."""
    reap_qemu(run.qemu, qmp)


def reap_qemu(qemu: subprocess.Popen, qmp: Qmp | None) -> None:
    if qmp is not None:
        qmp.close()
    if qemu.poll() is None:
        qemu.kill()
        qemu.wait()
    with _running_lock:
        _running.discard(qemu)


def kill_all() -> None:
    """Kill every QEMU started here (the main thread, interrupted while others wait on theirs)."""
    with _running_lock:
        for qemu in _running:
            qemu.kill()


@contextmanager
def running(cmd: list[str], work: Path, connect_by: float) -> Iterator[tuple[Run, Qmp]]:
    """QEMU started and its monitor connected; killed when the block ends, however it ends."""
    run = start(cmd, work)
    qmp = None
    try:
        qmp = Qmp(run.qmp_path, run.qemu, connect_by)
        yield run, qmp
    finally:
        reap(run, qmp)


def last_line(text: str) -> str:
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return lines[-1] if lines else ""


def wait_for(run: Run, marker: str, deadline: float, timeout: float) -> str:
    """The console text once the guest printed marker; GuestError naming what
    happened instead (a panic, QEMU's exit, nothing printed, no marker in time)."""
    text = ""
    while marker not in text:
        if run.qemu.poll() is not None:
            text = run.console_text()
            panic = [l.strip() for l in text.splitlines() if PANIC in l][-1:]
            if panic:
                raise GuestError(f"the kernel panicked: {panic[0]}")
            err = run.errors.read_text(errors="replace").strip().splitlines()[-1:]
            raise GuestError(f"QEMU exited (code {run.qemu.returncode}) before the guest was ready: "
                             f"{(err or [last_line(text) or 'no message'])[0].strip()}")
        if time.time() > deadline:
            if not text.strip():
                raise GuestError(f"the guest printed nothing on its serial console in {timeout:.0f} s")
            raise GuestError(f"the guest printed no {marker} in {timeout:.0f} s (console ends: {last_line(text)!r})")
        time.sleep(0.25)
        text = run.console_text()
    return text


def register(text: str, name: str) -> int:
    """A register of HMP's `info registers` (CR3=..., CPL=...)."""
    m = re.search(rf"(?<![A-Za-z0-9]){name}=([0-9a-fA-F]+)", text)
    if not m:
        raise GuestError(f"no {name}= in QEMU's info registers")
    return int(m.group(1), 16)


def stop_in_user_mode(qmp: Qmp, cpus: int, tries: int = USER_MODE_TRIES) -> tuple[list[str], int]:
    """Stop the VM at a moment when some CPU is at CPL 3; each CPU's `info registers` then,
    and the stop/cont rounds it took."""
    for attempt in range(tries):
        qmp.execute("stop")
        regs = [qmp.hmp("info registers", cpu=i) for i in range(cpus)]
        if any(register(r, "CPL") == 3 for r in regs):
            return regs, attempt + 1
        qmp.execute("cont")
        time.sleep(0.02 + 0.01 * (attempt % 10))
    raise GuestError(f"no CPU was at CPL 3 in {tries} stop/cont rounds")


def cpu_state(regs: list[str]) -> list[dict]:
    return [{"index": i, "cr3": register(r, "CR3"), "cr4": register(r, "CR4"), "efer": register(r, "EFER"),
             "cpl": register(r, "CPL"), "rip": register(r, "RIP")} for i, r in enumerate(regs)]


def walks(qmp: Qmp, cpu: int, la57: bool) -> tuple[str | None, str, float, float]:
    """QEMU's own walks of a CPU's CR3: info mem (None on 5-level) and info tlb, and their seconds.

    Not info mem on a 5-level guest: QEMU 7.2's mem_info_la57 tests the present
    bit inverted, prints nothing and takes 20-50 s per CPU doing it."""
    t0 = time.time()
    mem = None if la57 else qmp.hmp("info mem", cpu=cpu)
    t1 = time.time()
    tlb = qmp.hmp("info tlb", cpu=cpu)
    return mem, tlb, t1 - t0, time.time() - t1


def dump_core(qmp: Qmp, core: Path) -> int:
    """dump-guest-memory (no paging, no compression) into core, checked whole; its size."""
    qmp.execute("dump-guest-memory", paging=False, protocol=f"file:{core}")  # synchronous
    status = qmp.execute("query-dump")
    if not isinstance(status, dict) or status.get("status") != "completed":
        raise GuestError(f"dump-guest-memory did not complete: {status}")
    size = check_core(core)
    core.chmod(0o644)
    return size


def check_core(path: Path) -> int:
    """The ELF core is whole: every PT_LOAD's bytes are in the file.  Returns its size."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            raise GuestError(f"{path.name} is not a little-endian ELF64 file")
        e_type, = struct.unpack_from("<H", head, 16)
        e_phoff, = struct.unpack_from("<Q", head, 32)
        e_phentsize, e_phnum = struct.unpack_from("<HH", head, 54)
        if e_type != 4 or e_phnum == 0:
            raise GuestError(f"{path.name} is not an ELF core with program headers")
        f.seek(e_phoff)
        table = f.read(e_phentsize * e_phnum)
    end = 0
    loads = 0
    for i in range(e_phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", table, i * e_phentsize)
        end = max(end, p_offset + p_filesz)
        loads += p_type == 1
    if not loads or end > size:
        raise GuestError(f"{path.name} is truncated: {size} bytes, program headers need {end}")
    return size


def quit_qemu(qemu: subprocess.Popen, qmp: Qmp, timeout: float) -> None:
    """Ask QEMU to quit and wait for it to exit."""
    try:
        qmp.execute("quit")
    except GuestError:
        pass  # QEMU may close the socket before answering
    qemu.wait(timeout=timeout)


def qemu_version(qmp: Qmp) -> str:
    version = qmp.execute("query-version")
    text = "{major}.{minor}.{micro}".format(**version["qemu"])
    return text + (f" ({version['package'].strip()})" if version.get("package") else "")
