"""Entry/exit workloads: the virtual accesses and CR3 writes real entry code
makes, read from TOML files and played on an MMU over a modelled kernel.

A workload names addresses symbolically (`entry_stack_page.top-0x28`,
`cpu_tss_rw.sp2`, `idt+0x20`, `kernel_stack.top`, user `text`), resolved for
one kernel profile, CPU and process; see symbols() for the names. Its CR3
writes are the PTI macros of arch/x86/entry/calling.h and the mm switch of
arch/x86/mm/tlb.c, played by PTIState for the three regimes: PTI with PCID,
PTI without PCID (every CR3 write flushes the non-global entries), PTI off.

File format (one [[step]] per access or CR3 write):
    name = "syscall"
    summary = "..."
    source = "arch/x86/entry/entry_64.S (Linux 6.1)"
    processes = 1            # 2 for a context switch
    [[step]]
    do = "write"             # fetch | read | write | switch_to_kernel_cr3 | switch_to_user_cr3 | switch_mm | invlpg
    at = "entry_stack_page.top"
    count = 5                # consecutive 8-byte accesses ...
    stride = -8              # ... going down, as pushes do
    why = "the CPU pushes SS, RSP, RFLAGS, CS, RIP"
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ptilab.errors import InputError, UsageError
from ptilab.linux.kernel import ENTRY_TEXT, RODATA_START, SYMBOLS, TEXT_START, USER_MAPPINGS
from ptilab.memory.allocators import Allocator, Gfp
from ptilab.mmu.mmu import MMU
from ptilab.paging import entry as e
from ptilab.paging.cr3 import CR3_NOFLUSH, PTI_USER_PCID_BIT
from ptilab.paging.install import map_page

if TYPE_CHECKING:
    from ptilab.linux.kernel import Kernel

WORKLOAD_DIR = Path(__file__).with_name("workloads")
OPS = ("fetch", "read", "write", "switch_to_kernel_cr3", "switch_to_user_cr3", "switch_mm", "invlpg")
THREAD_SIZE = 0x4000  # 16 KiB task stacks (x86-64 with KASAN off)

# struct x86_hw_tss is packed: u32 reserved1, then sp0..sp2, a u64, ist[7].
TSS_FIELDS = {"sp0": 4, "sp1": 12, "sp2": 20} | {f"ist{i}": 36 + 8 * i for i in range(7)}

# Before 5.2 the IST stacks were one block, exception_stacks[], in
# (IST index) order DF, NMI, DB (8 KiB), MCE, with no guard pages.
ESTACKS_IN_ONE_BLOCK = {"estacks.DF_stack": (0x0000, 0x1000), "estacks.NMI_stack": (0x1000, 0x1000),
                        "estacks.DB_stack": (0x2000, 0x2000), "estacks.MCE_stack": (0x4000, 0x1000)}

PERCPU_VARIABLES = {"current_task": 0x0, "cpu_current_top_of_stack": 0x8, "__preempt_count": 0x10,
                    "cpu_tlbstate": 0x40}  # cpu_tlbstate: loaded_mm, ctxs[], user_pcid_flush_mask

_EXPR = re.compile(r"^(?P<name>[A-Za-z_][\w.]*?)(?:\.(?P<field>top|sp[012]|ist\d))?"
                   r"(?P<off>[+-](?:0x[0-9a-fA-F]+|[0-9]+))?$", re.ASCII)


@dataclass(frozen=True)
class Step:
    do: str
    at: str = ""
    count: int = 1
    stride: int = 8
    to: int = 0  # switch_mm: the process to run next
    of: int | None = None  # whose kernel_stack/task_struct/user pages `at` means (default: the running one)
    profiles: tuple[str, ...] = ()  # only for these kernel profiles (default: all)
    why: str = ""


@dataclass(frozen=True)
class Workload:
    name: str
    summary: str
    source: str
    processes: int
    steps: tuple[Step, ...]
    path: str


def available() -> list[str]:
    """Names of the workloads shipped with ptilab."""
    return sorted(p.stem for p in WORKLOAD_DIR.glob("*.toml"))


# The schema a workload file is checked against before anything runs: per
# key, its TOML type and what it may hold (a range of integers, the choices,
# or a string's longest length). The bounds keep one workload to seconds and
# megabytes: each process is a PGD pair with its own user tables, each access
# one modelled TLB lookup (about 20 000 a second per design).
MAX_PROCESSES = 64
MAX_STEPS = 2000
MAX_ACCESSES = 20_000  # count summed over the steps that access memory
MAX_OFFSET = 1 << 32  # `name+offset`: a kernel object is never 4 GiB away from its name
MAX_TEXT = 1000
WORKLOAD_SCHEMA: dict[str, tuple[type, object]] = {
    "name": (str, 80), "summary": (str, MAX_TEXT), "source": (str, MAX_TEXT),
    "processes": (int, range(1, MAX_PROCESSES + 1)), "step": (list, range(1, MAX_STEPS + 1)),
}
STEP_SCHEMA: dict[str, tuple[type, object]] = {
    "do": (str, OPS), "at": (str, 200), "count": (int, range(1, 4097)), "stride": (int, range(-4096, 4097)),
    "to": (int, range(MAX_PROCESSES)), "of": (int, range(MAX_PROCESSES)), "profiles": (list, 16),
    "why": (str, MAX_TEXT),
}
_ACCESSES = ("fetch", "read", "write")


def _check_value(where: str, key: str, value, kind: type, allowed) -> None:
    """One line naming the key and what it may be, if value is not that."""
    if isinstance(allowed, range):
        what = f"an integer from {allowed.start} to {allowed.stop - 1}" if kind is int \
            else f"{allowed.start} to {allowed.stop - 1} tables ([[{key}]])"
        ok = isinstance(value, kind) and not isinstance(value, bool) and \
            (value in allowed if kind is int else len(value) in allowed)
    elif isinstance(allowed, tuple):
        what, ok = f"one of {', '.join(allowed)}", value in allowed
    elif kind is list:
        what = f"a list of at most {allowed} strings"
        ok = isinstance(value, list) and len(value) <= allowed and all(isinstance(v, str) for v in value)
    else:
        what, ok = f"a string of at most {allowed} characters", isinstance(value, str) and len(value) <= allowed
    if not ok:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise InputError(f"{where}'{key}' must be {what}, not {shown}")


def _check_table(where: str, table: dict, schema: dict[str, tuple[type, object]]) -> None:
    for key, value in table.items():
        if key not in schema:
            raise InputError(f"{where}unknown key {key!r}; known: {', '.join(schema)}")
        _check_value(where, key, value, *schema[key])


def _check_at(where: str, at: str) -> None:
    m = _EXPR.match(at.replace(" ", ""))
    if not m:
        raise InputError(f"{where}'at' must be NAME[.top|.sp0-2|.ist0-6][+-OFFSET], not {at[:40]!r}")
    if m["off"] and abs(int(m["off"], 0)) >= MAX_OFFSET:
        raise InputError(f"{where}'at': the offset must be below {MAX_OFFSET:#x} in size, not {m['off'][:40]}")


def load(name_or_path: str | Path) -> Workload:
    """A shipped workload by name, or any TOML file by path, checked against
    WORKLOAD_SCHEMA and STEP_SCHEMA: InputError names the first key outside them."""
    from ptilab.formats.textfile import read_small_text
    from ptilab.linux.profiles import PROFILES

    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = WORKLOAD_DIR / f"{name_or_path}.toml"
        if not path.exists():
            raise UsageError(f"unknown workload {name_or_path!r}; choose one of: {', '.join(available())} "
                             "or give a .toml file")
    try:
        data = tomllib.loads(read_small_text(path, "a workload (TOML)"))
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{path}: not TOML: {err}") from None
    _check_table(f"{path}: ", data, WORKLOAD_SCHEMA)
    processes = data.get("processes", 1)
    steps = []
    for i, raw in enumerate(data.get("step", []), 1):
        where = f"{path}: step {i}: "
        if not isinstance(raw, dict):
            raise InputError(f"{where}must be a [[step]] table")
        if "do" not in raw:
            raise InputError(f"{where}'do' must be one of {', '.join(OPS)}")
        _check_table(where, raw, STEP_SCHEMA)
        if raw["do"] in ("fetch", "read", "write", "invlpg") and not raw.get("at"):
            raise InputError(f"{where}{raw['do']} needs 'at'")
        if raw.get("at"):
            _check_at(where, raw["at"])
        for key in ("to", "of"):
            if key in raw:
                _check_value(where, key, raw[key], int, range(processes))
        unknown = sorted(set(raw.get("profiles", ())) - set(PROFILES))
        if unknown:
            raise InputError(f"{where}'profiles' must name kernel profiles ({', '.join(PROFILES)}), not {unknown[0]!r}")
        steps.append(Step(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}))
    accesses = sum(s.count for s in steps if s.do in _ACCESSES)
    if accesses > MAX_ACCESSES:
        raise InputError(f"{path}: the steps make {accesses} accesses; at most {MAX_ACCESSES} (count summed over "
                         f"fetch, read and write steps)")
    return Workload(data.get("name", path.stem), data.get("summary", ""), data.get("source", ""), processes,
                    tuple(steps), str(path))


@dataclass(frozen=True)
class Process:
    """One mm with its PGD pair, and one task of it (its stack and task_struct)."""

    asid: int
    kernel_pgd: int
    user_pgd: int
    kernel_stack: int  # lowest address of the THREAD_SIZE stack
    task_struct: int


def _task(kernel: "Kernel", asid: int, kernel_pgd: int, user_pgd: int) -> Process:
    # Stacks and task_structs come from the buddy allocator and are reached
    # through the direct map, as on a kernel without CONFIG_VMAP_STACK.
    stack = kernel.alloc.alloc(Allocator.BUDDY, Gfp.KERNEL, "kernel", "task stack", THREAD_SIZE // e.PAGE_SIZE,
                               align=THREAD_SIZE)
    task = kernel.alloc.alloc(Allocator.BUDDY, Gfp.KERNEL, "kernel", "task_struct", 2)
    return Process(asid, kernel_pgd, user_pgd, kernel.direct_map_va(stack), kernel.direct_map_va(task))


def processes(kernel: "Kernel", count: int) -> list[Process]:
    """The model's init process, and count - 1 more made as fork()+exec() of the same binary would."""
    out = [_task(kernel, 0, kernel.mm_kernel_pgd, kernel.mm_user_pgd)]
    for asid in range(1, count):
        out.append(spawn_process(kernel, asid))
    return out


def spawn_process(kernel: "Kernel", asid: int) -> Process:
    """pgd_alloc(): a new 8 KiB PGD pair whose kernel halves copy the init
    pair, then user mappings of its own (fresh tables and pages) at the same
    addresses as init's; the kernel PGD's copy of each user entry gets NX
    (pti_set_user_pgtbl()). Mirrors Kernel._spawn_init_process()."""
    g = kernel.geometry
    pair = kernel.alloc.alloc(Allocator.BUDDY, Gfp.KERNEL, "kernel", "pgd pair (order 1)", 2, align=0x2000)
    for frame in (pair, pair + e.PAGE_SIZE):
        kernel.ram.clear_frame(frame >> e.PAGE_SHIFT)
    kernel_pgd, user_pgd = pair, pair + e.PAGE_SIZE
    for src, dst in ((kernel.kernel_pgd, kernel_pgd), (kernel.user_pgd, user_pgd)):
        frame = kernel.ram.read_frame(src >> e.PAGE_SHIFT)
        for i in range(256, 512):
            if frame[i]:
                kernel.write("kernel", dst + 8 * i, int(frame[i]))
    pages = sum(n for _, n, _ in USER_MAPPINGS)
    data = kernel.alloc.alloc(Allocator.BUDDY, Gfp.KERNEL, "kernel", "user pages", pages)
    alloc = kernel.table_allocator("kernel", "user page tables")
    for va, n, flags in USER_MAPPINGS:
        for p in range(n):
            map_page(kernel.ram, g, user_pgd, va + p * e.PAGE_SIZE, data, flags, alloc, table_flags=e.PAGE_TABLE)
            data += e.PAGE_SIZE
    user = kernel.ram.read_frame(user_pgd >> e.PAGE_SHIFT)
    for i in range(256):
        if user[i]:
            kernel.write("kernel", kernel_pgd + 8 * i, int(user[i]) | e.NX)
    return _task(kernel, asid, kernel_pgd, user_pgd)


def symbols(kernel: "Kernel", cpu: int, process: Process | None = None) -> dict[str, tuple[int, int]]:
    """Every name a workload may use, as (start, size), for one CPU and process.

    cpu_entry_area pieces by their struct member names (idt, gdt, tss,
    entry_stack_page, estacks.NMI_stack, entry_trampoline, ...); cpu_tss_rw
    (the TSS through its per-CPU direct-map address, as PER_CPU_VAR() reaches
    it); percpu (this CPU's percpu unit); lstar (what MSR_LSTAR points at: the
    cea trampoline where the profile has one, else the entry text);
    current_task, cpu_current_top_of_stack, __preempt_count, cpu_tlbstate
    (ordinary per-CPU variables); entry_text, kernel_text; the process's
    kernel_stack and task_struct (given a process); user text, data, stack.
    """
    p = kernel.profile
    names: dict[str, tuple[int, int]] = {}
    for piece in p.header:
        names[piece.name] = (kernel.piece_va(piece, None), piece.pages * e.PAGE_SIZE)
    for piece in p.per_cpu:
        names[piece.name] = (kernel.piece_va(piece, cpu), piece.pages * e.PAGE_SIZE)
    if "idt" not in names:
        # No RO IDT in the area (2017): idt_table in the kernel image's data.
        names["idt"] = (TEXT_START + SYMBOLS["idt_table"], e.PAGE_SIZE)
    if "exception_stacks" in names:
        block = names["exception_stacks"][0]
        for name, (offset, size) in ESTACKS_IN_ONE_BLOCK.items():
            names.setdefault(name, (block + offset, size))
    if "entry_stack_page" not in names and "tss" in names:
        # 2017: the trampoline stack lived in the (RW) TSS's last page.
        start, size = names["tss"]
        names["entry_stack_page"] = (start + size - e.PAGE_SIZE, e.PAGE_SIZE)
    unit = p.percpu_unit_pages * e.PAGE_SIZE
    names["cpu_tss_rw"] = (kernel.direct_map_va(kernel.percpu_pa(cpu, "cpu_tss_rw")), names["tss"][1])
    # This CPU's ordinary per-CPU variables, placed in the unit's last page
    # (the model packs the aliased ones from the unit's start).
    percpu = kernel.direct_map_va(kernel.percpu_base + cpu * unit + unit - e.PAGE_SIZE)
    names["percpu"] = (percpu, e.PAGE_SIZE)
    for name, offset in PERCPU_VARIABLES.items():
        names[name] = (percpu + offset, 8)
    names["entry_text"] = (ENTRY_TEXT[0], ENTRY_TEXT[1] - ENTRY_TEXT[0])
    names["lstar"] = names.get("entry_trampoline", names["entry_text"])
    names["kernel_text"] = (TEXT_START, RODATA_START - TEXT_START)
    if process is not None:
        names["kernel_stack"] = (process.kernel_stack, THREAD_SIZE)
        names["task_struct"] = (process.task_struct, 2 * e.PAGE_SIZE)
    for (va, n, _), name in zip(USER_MAPPINGS, ("text", "data", "stack")):
        names[name] = (va, n * e.PAGE_SIZE)
    return names


def resolve(expr: str, names: dict[str, tuple[int, int]]) -> int:
    """`name`, `name.top` (its last 8-byte slot), `name.sp0` (a TSS field), each with an optional ±offset."""
    m = _EXPR.match(expr.replace(" ", ""))
    if not m or m["name"] not in names:
        raise UsageError(f"workload address {expr!r}: unknown name; known: {', '.join(sorted(names))}")
    start, size = names[m["name"]]
    field = m["field"]
    if field == "top":
        start += size - 8
    elif field:
        start += TSS_FIELDS[field]
    va = start + (int(m["off"], 0) if m["off"] else 0)
    if not 0 <= va < 1 << 64:
        raise UsageError(f"workload address {expr!r} is {va:#x}: outside the 64-bit address space")
    return va


class PTIState:
    """The CR3 values the kernel writes, and when it may keep the TLB.

    calling.h: SWITCH_TO_KERNEL_CR3 always sets NOFLUSH under PCID (kernel
    mappings of this ASID are never stale); SWITCH_TO_USER_CR3 sets it unless
    the ASID's bit in cpu_tlbstate.user_pcid_flush_mask asks for a flush.
    tlb.c: switch_mm_irqs_off() loads the next mm's kernel CR3 with
    kern_pcid(asid) = asid + 1, flushing only when the ASID's context is new
    (and then marking the user PCID for a flush too, invalidate_user_asid()).
    Without PCID every write flushes; with PTI off there is one CR3 per mm."""

    def __init__(self, mmu: MMU, procs: list[Process], pti: bool, pcid: bool):
        self.mmu, self.procs, self.pti, self.pcid = mmu, procs, pti, pcid
        self.current = 0
        self.user_pcid_flush_mask: set[int] = set()
        self.loaded_asids = {0}

    def _kernel_cr3(self, proc: Process) -> int:
        return proc.kernel_pgd | (proc.asid + 1 if self.pcid else 0)

    def _user_cr3(self, proc: Process) -> int:
        if not self.pti:
            return self._kernel_cr3(proc)
        return proc.user_pgd | ((proc.asid + 1) | 1 << PTI_USER_PCID_BIT if self.pcid else 0)

    def enter_user(self) -> None:
        """The state a workload starts from: process 0 running in user mode."""
        self.mmu.mov_cr3(self._user_cr3(self.procs[0]), "user" if self.pti else "kernel")

    def switch_to_kernel_cr3(self) -> None:
        if self.pti:
            self.mmu.mov_cr3(self._kernel_cr3(self.procs[self.current]) | (CR3_NOFLUSH if self.pcid else 0), "kernel")

    def switch_to_user_cr3(self) -> None:
        if not self.pti:
            return
        proc = self.procs[self.current]
        flush = proc.asid in self.user_pcid_flush_mask
        self.user_pcid_flush_mask.discard(proc.asid)
        noflush = CR3_NOFLUSH if self.pcid and not flush else 0
        self.mmu.mov_cr3(self._user_cr3(proc) | noflush, "user")

    def switch_mm(self, to: int) -> None:
        proc = self.procs[to]
        new = proc.asid not in self.loaded_asids
        self.loaded_asids.add(proc.asid)
        if new:
            self.user_pcid_flush_mask.add(proc.asid)
        noflush = CR3_NOFLUSH if self.pcid and not new else 0
        self.current = to
        self.mmu.mov_cr3(self._kernel_cr3(proc) | noflush, "kernel")


@dataclass(frozen=True)
class Miss:
    """A TLB miss one step caused: where, under which view, and what the walk did."""

    step: int
    at: str
    va: int
    view: str
    loads: int
    fault: bool


def play(workload: Workload, mmu: MMU, state: PTIState, names: list[dict[str, tuple[int, int]]],
         profile: str) -> list[Miss]:
    """Run the workload's steps once for a kernel profile (names per process);
    returns every TLB miss in order."""
    misses: list[Miss] = []
    for index, step in enumerate(workload.steps):
        if step.profiles and profile not in step.profiles:
            continue
        where = names[state.current if step.of is None else step.of]
        if step.do == "switch_to_kernel_cr3":
            state.switch_to_kernel_cr3()
        elif step.do == "switch_to_user_cr3":
            state.switch_to_user_cr3()
        elif step.do == "switch_mm":
            state.switch_mm(step.to)
        elif step.do == "invlpg":
            mmu.invlpg(resolve(step.at, where))
        else:
            base = resolve(step.at, where)
            last = base + (step.count - 1) * step.stride
            if not 0 <= last < 1 << 64:
                raise UsageError(f"workload step {index + 1}: {step.count} accesses from {step.at!r} "
                                 f"leave the 64-bit address space")
            for k in range(step.count):
                va = base + k * step.stride
                before_miss, before_loads = mmu.stats.tlb_misses, mmu.stats.walk_loads
                hit = mmu.access(va, fetch=step.do == "fetch")
                if mmu.stats.tlb_misses != before_miss:
                    misses.append(Miss(index, step.at, va, mmu.view, mmu.stats.walk_loads - before_loads,
                                       hit is None))
    return misses
