"""The `ptilab` command: parse arguments, call the API, print. Nothing else.

Every run computes its whole result before printing any of it, and writes
files whole or not at all (ptilab.terminal.atomic_file), so an error
leaves one line on stderr, nothing on stdout and no half-written file.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from contextlib import ExitStack

import click
from click.shell_completion import CompletionItem

from ptilab.errors import InputError, PtilabError, UsageError
from ptilab.terminal import Output, atomic_file, output_target

# ptilab does no linear algebra, but numpy's OpenBLAS starts a thread per core
# when numpy is imported, and they spin: 0.09 s of CPU time per run on two cores
# (bench/startup.py), as much as the rest of numpy's import. A user's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

DEFAULT_PROFILE = "linux-6.1"
DEFAULT_CPUS = 4
COMPLETE_VAR = "_PTILAB_COMPLETE"
EXIT_META = "ptilab.exit_code"  # the exit code a command has decided on before it prints

EXIT_CODES = """\b
Exit codes:
  0    success
  1    ptilab audit found something at or above --fail-on
       ptilab dump: the tables are malformed or no CPU could run on them
  2    bad usage or bad input: one line on stderr, "ptilab: error: ..."
  130  interrupted (Ctrl-C)
  143  terminated (SIGTERM)

\b
Files written (report OUT, cost --plot): whole or not at all, and only a
regular file or a new one; a symlink is followed and its target replaced.
A device, FIFO, directory, '' or '-' is refused before any work.

\b
Output: tables and colour on a terminal, plain aligned text when piped;
progress bars on stderr when it is a terminal. NO_COLOR and FORCE_COLOR
are honoured. Shell completion: eval "$(ptilab completion bash)".
"""


def _out() -> Output:
    """The Output the group set up for this run (a default one outside it)."""
    ctx = click.get_current_context(silent=True)
    found = ctx.find_object(Output) if ctx else None
    return found or Output()


# -- shell completion -------------------------------------------------------

def _complete_from(names, listed: bool = False):
    """A shell_complete callback offering names; listed: the value is a comma-separated list."""
    def complete(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
        head, comma, last = incomplete.rpartition(",") if listed else ("", "", incomplete)
        return [CompletionItem(head + comma + name) for name in names() if name.startswith(last)]
    return complete


def _profile_names() -> list[str]:
    from ptilab.linux.profiles import PROFILES
    return list(PROFILES)


def _design_names() -> list[str]:
    from ptilab.pti import DESIGNS
    return list(DESIGNS)


def _cost_design_names() -> list[str]:
    from ptilab.mmu.cost import PTI_OFF
    return ["all", *_design_names(), PTI_OFF]


def _core_names() -> list[str]:
    from ptilab.mmu.tlb import CORES
    return list(CORES)


def _complete_workload(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    from ptilab.mmu.workload import available
    named = [CompletionItem(name) for name in available() if name.startswith(incomplete)]
    return named or [CompletionItem(incomplete, type="file")]  # else a TOML file of one's own


kernel_option = click.option("--kernel", "profile", default=DEFAULT_PROFILE, show_default=True, metavar="PROFILE",
                             shell_complete=_complete_from(_profile_names),
                             help="Kernel layout profile: kaiser-2017, linux-4.15, linux-6.1 or linux-6.12.")
cpus_option = click.option("--cpus", default=DEFAULT_CPUS, show_default=True, type=int,
                           help="NR_CPUS (possible CPUs), 1 to 8192.")
paging_option = click.option("--paging", "levels", default="4", show_default=True, metavar="4|5",
                             help="Paging levels: 4 (PML4) or 5 (LA57).")


def cea_options(command):
    """--seed and --kaslr/--nokaslr: init_cea_offsets()'s random cpu_entry_area slots (linux-6.12)."""
    # Not negative: random.Random(-n) seeds as n would, two seeds for one layout.
    command = click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
                           help="Seed of the random per-CPU cpu_entry_area slots (profiles with random slots: "
                                "linux-6.12); one seed, one reproducible layout.")(command)
    return click.option("--kaslr/--nokaslr", default=True, show_default=True,
                        help="KASLR on: each CPU's cpu_entry_area at a random slot of 512 GiB (linux-6.12); "
                             "off: slot = CPU. The model randomises nothing else.")(command)


def _check_cea_options(ctx: click.Context, profile: str) -> None:
    """Refuse --seed/--kaslr for a profile whose cpu_entry_area slots are fixed."""
    from ptilab.linux.profiles import get_profile

    if not get_profile(profile).random_cea_slots:
        _refuse(ctx, ("seed", "kaslr"), f"{profile} puts every CPU's cpu_entry_area at a fixed slot "
                                        f"(random slots came with Linux 6.2: use --kernel linux-6.12)")


json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print the result as one JSON document on stdout, and nothing else there.")


def _design_option(help: str):
    return click.option("--design", default="linux", show_default=True, metavar="DESIGN",
                        shell_complete=_complete_from(_design_names), help=help)


def _design_list(text: str, with_off: bool = False) -> list[str]:
    """--design DESIGN[,DESIGN...] or 'all', each name checked; with_off: PTI off (the baseline) counts too."""
    from ptilab.mmu.cost import PTI_OFF
    from ptilab.pti import get_design

    if text == "all":
        return [*_design_names(), *([PTI_OFF] if with_off else [])]
    chosen = text.split(",")
    for design in chosen:
        if not (with_off and design == PTI_OFF):
            get_design(design)
    _refuse_repeats("--design", chosen)
    return chosen


def _refuse_repeats(option: str, values: list) -> None:
    """A list naming one value twice would print the same row twice: a slip, refused."""
    seen = set()
    for value in values:
        if value in seen:
            raise UsageError(f"{option} names {value} twice")
        seen.add(value)


def _levels(text: str) -> int:
    if text not in ("4", "5"):
        raise UsageError(f"--paging must be 4 or 5, not {text!r}")
    return int(text)


def _check_kernel(profile: str, cpus: int, levels: int) -> None:
    """Refuse a kernel the model cannot boot, with the message booting it would give."""
    from ptilab.linux.kernel import NR_CPUS_MAX
    from ptilab.linux.profiles import get_profile

    if not 1 <= cpus <= NR_CPUS_MAX:
        raise UsageError(f"NR_CPUS must be between 1 and {NR_CPUS_MAX}, not {cpus}")
    get_profile(profile).check(cpus, levels)


def _given(ctx: click.Context, *names: str) -> list[str]:
    """The options among names that the command line set (as --option words)."""
    from click.core import ParameterSource

    flags = {p.name: p.opts[0] for p in ctx.command.params}
    return [flags[name] for name in names if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE]


def _refuse(ctx: click.Context, names: tuple[str, ...], why: str) -> None:
    given = _given(ctx, *names)
    if given:
        raise UsageError(f"{', '.join(given)}: {why}")


class _Cli(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            # Here rather than in click, which would first print an empty line.
            raise click.exceptions.Abort() from None
        except BrokenPipeError:
            # The reader (head, less) went away: stop quietly, as cat would,
            # and keep Python from complaining when it flushes stdout at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(ctx.meta.get(EXIT_META, 0))


@click.group(cls=_Cli, invoke_without_command=True, epilog=EXIT_CODES,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ptilab", prog_name="ptilab")
@click.option("-q", "--quiet", is_flag=True,
              help="Results and errors only: no progress bars, no 'wrote FILE' lines.")
@click.option("--color/--no-color", default=None,
              help="Force colour and boxed tables even when stdout is not a terminal, or never colour. "
                   "Default: as the terminal and NO_COLOR/FORCE_COLOR say.")
@click.pass_context
def cli(ctx: click.Context, quiet: bool, color: bool | None) -> None:
    """ptilab: x86-64 kernel page-table isolation (KAISER / Linux PTI), executable.

    Under PTI the kernel runs on one page-table tree and user space on a
    second, nearly empty one that must still map the cpu_entry_area. ptilab
    models the three designs weighed in the KAISER review (explicit, mirror,
    shared-pmd) and what Linux shipped (linux), and compares them.

    With no command, compares all designs on linux-6.1 with 4 CPUs.
    Options before the command (--quiet, --color) apply to every command.

    \b
    Examples:
      ptilab                                  # compare designs on the default kernel
      ptilab compare --kernel kaiser-2017 --cpus 64
      ptilab simulate --design shared-pmd --cpus 2 --view user
      ptilab layout-change --kernel linux-6.1
      ptilab --quiet report designs.html      # no progress, no "wrote" line
      ptilab --no-color audit guest.core | less
    """
    out = ctx.obj = Output(quiet, color)
    ctx.with_resource(out.progress())
    if ctx.invoked_subcommand is None:
        ctx.invoke(compare)


@cli.command()
@kernel_option
@cpus_option
@paging_option
@cea_options
@json_option
@click.pass_context
def compare(ctx: click.Context, profile: str, cpus: int, levels: str, kaslr: bool, seed: int,
            as_json: bool) -> None:
    """Compare every design: memory, writes, AP work, allocator legality,
    table sharing and the user view of the cpu_entry_area against the kernel's.

    \b
    Examples:
      ptilab compare
      ptilab compare --kernel linux-4.15 --cpus 64 --paging 5 --json
      ptilab compare --kernel linux-6.12 --cpus 256 --seed 7   # random per-CPU slots
      ptilab compare --cpus 4096 | less     # plain text when piped
    """
    from ptilab.compare.metrics import compare as run_compare
    from ptilab.report.tables import compare_table

    _check_cea_options(ctx, profile)
    reports = run_compare(profile, cpus, _levels(levels), kaslr=kaslr, seed=seed)
    if as_json:
        _out().json([r.as_dict() for r in reports])
    else:
        _out().table(compare_table(reports))


@cli.command("layout-change")
@kernel_option
@cpus_option
@paging_option
@cea_options
@json_option
@click.pass_context
def layout_change(ctx: click.Context, profile: str, cpus: int, levels: str, kaslr: bool, seed: int,
                  as_json: bool) -> None:
    """Change the kernel's cpu_entry_area layout (a new piece, the TSS's
    rights, guard pages) and report which designs stay correct unmodified.

    \b
    Examples:
      ptilab layout-change --kernel kaiser-2017 --cpus 2
      ptilab layout-change --json
    """
    from ptilab.compare.layout_change import run
    from ptilab.report.tables import layout_change_table

    # run() reports a layout that fails to boot as an outcome; one that fails
    # as given is the user's mistake, and an error.
    _check_kernel(profile, cpus, _levels(levels))
    _check_cea_options(ctx, profile)
    outcomes = run(profile, cpus, _levels(levels), kaslr, seed)
    if as_json:
        _out().json([o.__dict__ for o in outcomes])
    else:
        _out().table(layout_change_table(outcomes, profile))


@cli.command()
@_design_option("explicit, mirror, shared-pmd or linux.")
@kernel_option
@cpus_option
@paging_option
@cea_options
@click.option("--view", type=click.Choice(["user", "kernel", "both"]), default="both", show_default=True,
              help="Which half of the PGD pair to print.")
@json_option
@click.pass_context
def simulate(ctx: click.Context, design: str, profile: str, cpus: int, levels: str, kaslr: bool, seed: int,
             view: str, as_json: bool) -> None:
    """Boot a modelled kernel with one design and print its page tables in
    Linux ptdump format (as /sys/kernel/debug/page_tables/current_user and
    current_kernel would show them).

    \b
    Examples:
      ptilab simulate --design explicit --kernel kaiser-2017 --cpus 2
      ptilab simulate --design linux --paging 5 --view user --json
    """
    from ptilab.formats.ptdump import format_walk, linux_markers
    from ptilab.pti import boot
    from ptilab.paging import walk

    _check_cea_options(ctx, profile)
    kernel = boot(profile, design, cpus, _levels(levels), kaslr, seed)
    views = {"user": kernel.user_cr3(), "kernel": kernel.kernel_cr3()}
    chosen = ["user", "kernel"] if view == "both" else [view]
    walks = {name: walk(kernel.ram, views[name], kernel.geometry) for name in chosen}
    if as_json:
        from ptilab.formats.jsonout import walk_to_dict
        _out().json({name: walk_to_dict(w) for name, w in walks.items()})
        return
    text = []
    for name, w in walks.items():
        title = "current_user" if name == "user" else "current_kernel"
        text.append(f"# {title}: design {design}, {profile}, {cpus} CPUs, {kernel.geometry.levels}-level, "
                    f"CR3 {w.cr3}\n")
        text.append(format_walk(w, linux_markers(kernel.geometry)))
    _out().text("".join(text))


PLOT_SUFFIXES = (".png", ".svg")


@cli.command("cost")
@kernel_option
@click.option("--cpus", "cpus_list", default=str(DEFAULT_CPUS), show_default=True, metavar="N[,N...]",
              help="NR_CPUS; several, comma-separated, sweep them (and plot against them).")
@paging_option
@click.option("--pcid/--no-pcid", default=True, show_default=True,
              help="CR4.PCIDE: PTI's PCID pair with NOFLUSH switches, or every CR3 write flushing.")
@click.option("--design", "designs", default="all", show_default=True, metavar="DESIGN[,DESIGN...]",
              shell_complete=_complete_from(_cost_design_names, listed=True),
              help="explicit, mirror, shared-pmd, linux, or off (PTI off: the baseline); 'all' is all five.")
@click.option("--workload", "workloads", multiple=True, metavar="NAME|FILE.toml", shell_complete=_complete_workload,
              help="syscall, interrupt, nmi, context-switch, or your own TOML file; repeatable. Default: all shipped.")
@click.option("--cpu", type=int, default=0, show_default=True, help="The CPU whose cpu_entry_area the workloads use.")
@click.option("--core", default="skylake", show_default=True, metavar="CORE", shell_complete=_complete_from(_core_names),
              help="Whose TLB hierarchy: skylake, haswell or zen2 (sizes from Intel's and AMD's optimisation guides).")
@json_option
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Also write a PNG or SVG of the refill cost against NR_CPUS and per design (needs matplotlib).")
def cost_command(profile: str, cpus_list: str, levels: str, pcid: bool, designs: str, workloads: tuple[str, ...],
                 cpu: int, core: str, as_json: bool, plot_file: str | None) -> None:
    """Measure the TLB-refill cost of entry/exit workloads per design: TLB
    misses, page-walk loads, and the distinct cache lines the walks touch,
    with how many of them both the kernel and the user tables use (the
    seed's "fewer cache lines needed to refill the TLB").

    \b
    Examples:
      ptilab cost                                   # every design and workload, linux-6.1, 4 CPUs, PCID
      ptilab cost --design mirror,linux --workload nmi --no-pcid
      ptilab cost --cpus 1,4,16,64,256 --plot refill.svg
      ptilab cost --workload my-entry.toml --json
    """
    from ptilab.mmu.cost import same_for_every_nr_cpus, sweep
    from ptilab.mmu.tlb import get_core
    from ptilab.mmu.workload import load
    from ptilab.report.tables import refill_table

    try:
        cpus = [int(n) for n in cpus_list.split(",")]
    except ValueError:
        raise UsageError(f"--cpus must be numbers separated by commas, not {cpus_list!r}") from None
    _refuse_repeats("--cpus", cpus)
    # Refuse a bad name or plot file now, not after minutes of sweeping.
    chosen = _design_list(designs, with_off=True)
    get_core(core)
    for n in cpus:
        _check_kernel(profile, n, _levels(levels))
    for workload in workloads:
        load(workload)
    if plot_file is not None:
        output_target(plot_file)
    if plot_file is not None and os.path.splitext(plot_file)[1].lower() not in PLOT_SUFFIXES:
        raise UsageError(f"plot file must end in .png or .svg, not {os.path.basename(plot_file)!r}")
    with ExitStack() as stack:
        plot_tmp = stack.enter_context(atomic_file(plot_file)) if plot_file else None
        costs = sweep(profile, cpus, chosen, _levels(levels), list(workloads) or None, pcid, cpu, core)
        if plot_tmp:
            from ptilab.report.plots import plot_refill
            plot_refill(costs, plot_tmp)
    out = _out()
    if as_json:
        out.json([c.as_dict() for c in costs])
    else:
        shown = costs
        if same_for_every_nr_cpus(costs):
            # Four identical blocks would hide the answer: say it once.
            shown = [c for c in costs if c.cpus == cpus[0]]
        out.table(refill_table(shown))
        if shown is not costs:
            out.info(f"NR_CPUS {', '.join(map(str, cpus))}: identical counts for every design and workload, shown "
                     f"once (the workloads run on CPU {cpu}; the other CPUs' cpu_entry_areas are never walked)")
        if plot_file:
            out.info(f"plot written to {plot_file}")


# -- ptilab overhead (issue 22): a self-contained block ------------------------

def _preset_names() -> list[str]:
    from ptilab.mmu.cycles import PRESETS
    return list(PRESETS)


def _latency_overrides(given: tuple[str, ...]) -> dict[str, float]:
    """--latency TERM=CYCLES, repeatable."""
    out = {}
    for item in given:
        term, eq, value = item.partition("=")
        try:
            cycles = float(value)
        except ValueError:
            cycles = -1.0
        if not eq or not cycles >= 0 or cycles == float("inf"):
            raise UsageError(f"--latency takes TERM=CYCLES (a number of cycles, 0 or more), not {item!r}")
        out[term] = cycles
    return out


@cli.command("overhead")
@click.option("--core", default="skylake", show_default=True, metavar="CORE",
              shell_complete=_complete_from(_preset_names),
              help="Core preset: skylake, haswell, zen2 or goldmont (TLBs, clock and latencies, sources in "
                   "docs/design.md).")
@click.option("--kernel", "profile", default="kaiser-2017", show_default=True, metavar="PROFILE",
              shell_complete=_complete_from(_profile_names),
              help="Kernel layout profile (kaiser-2017: the kernel Hansen measured).")
@click.option("--design", "designs", default="all", show_default=True, metavar="DESIGN[,DESIGN...]",
              shell_complete=_complete_from(_design_names, listed=True), help="The designs to run with PTI on.")
@click.option("--global", "globals_", default="none,entry,text", show_default=True, metavar="MODE[,MODE...]",
              help="What the tables mark global: none, entry (entry text and cpu_entry_area, what Linux does), "
                   "text (the whole kernel text, pti_kernel_image_global_ok() without PCID).")
@click.option("--working-set", "working_sets", default="0", show_default=True, metavar="N[,N...]",
              help="User pages touched between two calls; several sweep them.")
@click.option("--latency", "latencies", multiple=True, metavar="TERM=CYCLES",
              help="Override one of the preset's latencies (cr3_flush, cr3_noflush, stlb_hit, stlb_miss, "
                   "walk_load_l1, walk_load_l2, invpcid, invlpg); repeatable.")
@click.option("--hansen", is_flag=True, help="Also print the model beside Hansen's lseek1 measurements.")
@click.option("--refill", is_flag=True,
              help="Also print, per preset and design, the cycles per call and per cold refill (the seed's question).")
@json_option
def overhead_command(core: str, profile: str, designs: str, globals_: str, working_sets: str,
                     latencies: tuple[str, ...], hansen: bool, refill: bool, as_json: bool) -> None:
    """What PTI costs a system call, in cycles: will-it-scale's lseek1
    round trip (entry, ksys_lseek on a regular file, exit) under PTI on/off,
    PCID on/off, each global mode and design, priced with cited latencies.

    \b
    Examples:
      ptilab overhead                                   # every configuration on skylake
      ptilab overhead --core goldmont --design linux --json
      ptilab overhead --design linux --global entry --working-set 0,16,64,256
      ptilab overhead --design explicit --hansen
    """
    from ptilab.linux.profiles import get_profile
    from ptilab.mmu import overhead as oh
    from ptilab.mmu.cycles import PRESETS, get_preset
    from ptilab.report.tables import hansen_table, overhead_table, refill_cycles_table

    preset = get_preset(core).override(**_latency_overrides(latencies))
    get_profile(profile)
    chosen = _design_list(designs)
    modes = [m for m in globals_.split(",")]
    for mode in modes:
        if mode not in oh.GLOBALS:
            raise UsageError(f"--global takes none, entry or text, not {mode!r}")
    _refuse_repeats("--global", modes)
    try:
        sizes = [int(n) for n in working_sets.split(",")]
    except ValueError:
        raise UsageError(f"--working-set must be numbers separated by commas, not {working_sets!r}") from None
    _refuse_repeats("--working-set", sizes)
    for n in sizes:
        if not 0 <= n <= oh.MAX_WORKING_SET:
            raise UsageError(f"--working-set must be 0 to {oh.MAX_WORKING_SET} pages, not {n}")
    configs = oh.configurations(chosen, tuple(modes))
    costs = oh.working_set_sweep(sizes, configs, profile, preset)
    rows = oh.hansen_rows(oh.overhead(None, profile, preset), chosen[0]) if hansen else None
    refills = [(name, *row) for name in PRESETS for row in oh.design_differences(name)] if refill else None
    out = _out()
    if as_json:
        doc = [c.as_row() for c in costs]
        if hansen or refill:
            doc = {"configurations": doc}
            if rows:
                doc["hansen"] = [{"configuration": a, "measured": b, "model": round(c, 4)} for a, b, c in rows]
            if refills:
                doc["refill"] = [{"core": a, "design": b, "cycles_per_call": round(c, 1),
                                  "cycles_per_cold_refill": round(d, 1)} for a, b, c, d in refills]
        out.json(doc)
        return
    out.table(overhead_table(costs, f"lseek1 on {preset.name} ({preset.clock_hz / 1e9:.1f} GHz), {profile}"))
    if rows:
        out.table(hansen_table(rows))
    if refills:
        out.table(refill_cycles_table(refills))


def _refuse_text_image(image: str) -> None:
    """A memory image starts with binary data (the real-mode IVT at physical 0,
    or a dump format's header): one whose first KiB is all text was given by mistake."""
    from ptilab.formats.textfile import SNIFF, check_text, describe_text

    from ptilab.files import open_input, require_image_file
    from ptilab.memory.images import dump_format

    require_image_file(image)
    try:
        with open_input(image) as f:
            head = f.read(SNIFF)
    except OSError:
        return  # open_image() says why
    if not head or dump_format(head):
        return  # open_image() judges a dump by its header, however short
    try:
        check_text(head, image, "text")
    except InputError:
        return  # binary: an image
    raise InputError(f"{image}: text ({describe_text(head)}), not a memory image")


def _parse_cr3(text: str) -> int:
    # Hex digits only (int() would also take underscores and non-ASCII digits).
    value = int(text, 16) if re.fullmatch(r"(0x)?[0-9a-f]{1,16}", text, re.ASCII | re.IGNORECASE) else -1
    if not 0 <= value < 1 << 64:
        raise UsageError(f"--cr3 must be a 64-bit hexadecimal number, not {text!r}")
    return value


def _open_image_and_cr3(image: str, cr3: str | None, cpu: int | None, la57: bool | None):
    """The image, the CR3 to judge and the paging mode: from the options, or
    from QEMU's per-CPU notes in the core (a CPU in user mode first)."""
    from ptilab.linux.paging_mode import image_root, paging_mode
    from ptilab.memory.images import open_image

    if cr3 is not None and cpu is not None:
        raise UsageError("--cpu takes a CPU's CR3 from the core; give --cpu or --cr3, not both")
    if cr3 is not None:
        value = _parse_cr3(cr3)
    _refuse_text_image(image)
    mem = open_image(image)
    if cr3 is None:
        return mem, *image_root(mem, image, cpu, la57)
    return mem, value, paging_mode(mem, value, la57)


image_options = [
    click.option("--cr3", default=None, metavar="HEX", help="CR3 to walk (PCID bits and bit 63 are ignored). "
                 "Default: from the core's QEMU notes, a CPU in user mode first; else init_top_pgt from its VMCOREINFO."),
    click.option("--cpu", type=int, default=None, help="With a QEMU core: take this CPU's CR3 and CR4."),
    click.option("--la57/--no-la57", default=None,
                 help="5- or 4-level paging. Default: CR4.LA57 from the core's notes, else VMCOREINFO, else the "
                      "depth at which the tables map the cpu_entry_area; one the dump contradicts is refused."),
]
IMAGE_OPTIONS = ("cr3", "cpu", "la57")
live_option = click.option(
    "--live", default=None, is_flag=False, flag_value="/", metavar="[ROOT]",
    help="The running kernel, through /proc/kcore (root only): init_mm's PGD pair from its VMCOREINFO. "
         "ROOT is where this machine's /proc and /sys are mounted (default /; e.g. /host in a container).")


def _open_live(ctx: click.Context, root: str):
    """The running kernel under root, with the options that make no sense for it refused."""
    from pathlib import Path

    from ptilab.audit.live import open_live

    _refuse(ctx, ("cpu", "la57"), "only with an IMAGE: --live takes the paging mode from the kernel's VMCOREINFO")
    return open_live(Path(root))


def _with_image_options(fn):
    for option in reversed(image_options):
        fn = option(fn)
    return fn


def _symbols(system_map: str | None) -> dict[str, int] | None:
    if not system_map:
        return None
    from ptilab.formats.kallsyms import USED, read_symbols
    return read_symbols(system_map, USED)


cpu_meltdown_option = click.option(
    "--cpu-meltdown", type=click.Choice(["affected", "not-affected", "xen-pv"]), default=None,
    help="What you know of the machine's CPU, for when the image says nothing (no kernel log, no sysfs): affected "
         "by Meltdown, not affected (AMD, Hygon, Intel with RDCL_NO), or a Xen PV guest. The kernel's own word "
         "outranks it; a disagreement is reported.")

cluster_options = [
    click.option("--scheduler", default=None, metavar="tcp://HOST:PORT",
                 help="Run on this Dask cluster (the images must be on a path every worker can read). "
                      "Default: a local cluster of worker processes where the work is worth starting one: a "
                      "large image, or several whose first, timed here, says the rest would take longer "
                      "than a cluster's start-up."),
    click.option("--workers", type=click.IntRange(min=0), default=None,
                 help="Worker processes of a local cluster, started whatever the work (default: one per core, "
                      "when the work is worth it); 0 runs in this process."),
]


def _with_cluster_options(fn):
    for option in reversed(cluster_options):
        fn = option(fn)
    return fn


@cli.command("audit")
@click.argument("images", metavar="IMAGE...", nargs=-1, type=click.Path(dir_okay=False))
@_with_image_options
@live_option
@click.option("--ptdump", "ptdump_file", type=click.Path(dir_okay=False), default=None,
              help="Audit Linux ptdump text (current_user, or kernel/current_kernel) instead of an image.")
@click.option("--system-map", type=click.Path(dir_okay=False), default=None,
              help="System.map or /proc/kallsyms text, to name the entry text (KASLR slide inferred).")
@click.option("--fail-on", default="medium", show_default=True, metavar="SEVERITY",
              help="Exit 1 if a finding is at least this severe: info, low, medium, high, critical.")
@cpu_meltdown_option
@json_option
@_with_cluster_options
@click.pass_context
def audit_command(ctx, images, cr3, cpu, la57, live, ptdump_file, system_map, fail_on, cpu_meltdown, as_json,
                  scheduler, workers) -> None:
    """Check a real kernel's page tables against PTI's promises: what the
    user tables expose of the kernel and with which rights.

    IMAGE is an ELF core (QEMU dump-guest-memory, kdump vmcore), a
    kdump-compressed dump (makedumpfile, dump-guest-memory -z), a LiME dump or
    a raw physical image. Several images: one row each (a JSON list), audited on a
    local cluster of worker processes or on --scheduler's.

    With --live, the running kernel (as root): init_mm's PGD pair read
    through /proc/kcore, held against what the kernel reports
    (vulnerabilities/meltdown, the pti CPU flag, its log, the command line)
    and against debugfs's current_user where the kernel has it.

    Exit code 0: nothing at or above --fail-on; 1: found; 2: bad input.

    \b
    Examples:
      ptilab audit guest.core                     # CR3 of a user-mode CPU from the core
      sudo ptilab audit --live                    # this machine
      ptilab audit mem.raw --cr3 61d9000 --system-map kallsyms.txt
      ptilab audit --ptdump current_user.txt --json
      ptilab audit guest.core --fail-on low && echo clean
      ptilab audit fleet/*.core --json            # one row per image
    """
    from ptilab.audit.findings import Severity
    from ptilab.report.tables import audit_header, findings_table

    threshold = Severity.parse(fail_on)
    stated = _stated_exposure(cpu_meltdown)
    if len(images) > 1:
        if ptdump_file or live:
            raise UsageError(f"give IMAGEs or {'--ptdump' if ptdump_file else '--live'}, not both")
        _refuse(ctx, ("cr3",), "one CR3 cannot fit several images; each image's CPU notes give its own")
        _audit_images(ctx, images, cpu, la57, _symbols(system_map), stated, threshold, as_json, scheduler, workers)
        return
    _refuse(ctx, ("scheduler", "workers"), "only with several IMAGEs")
    image = images[0] if images else None
    _one_audit_source(ctx, image, ptdump_file, live)
    symbols = _symbols(system_map)
    out = _out()
    if live:
        result = _audit_live(ctx, live, cr3, symbols, stated, out)
    elif ptdump_file:
        from ptilab.audit.image import audit_ptdump
        result = audit_ptdump(ptdump_file, symbols, stated)
    else:
        result = _audit_image(image, cr3, cpu, la57, symbols, stated, out)
    failed = any(f.severity >= threshold for f in result.findings)
    # Decided before printing: a reader that stops early (| head) still gets the verdict.
    ctx.meta[EXIT_META] = 1 if failed else 0
    if as_json:
        from ptilab.formats.jsonout import ranges_to_list, walk_to_dict
        user_view = (walk_to_dict(result.found.user) if result.found is not None
                     else {"ranges": ranges_to_list(result.views.user, result.views.geometry)})
        out.json({**result.as_dict(), "user_view": user_view})
    else:
        for line in audit_header(result):
            out.line(line)
        out.table(findings_table(list(result.findings), f"PTI audit of {result.subject}"))
    if failed:
        ctx.exit(1)


def _stated_exposure(choice: str | None):
    """--cpu-meltdown as the exposure it states."""
    if choice is None:
        return None
    from ptilab.linux.exposure import Meltdown
    return {"affected": Meltdown.AFFECTED, "not-affected": Meltdown.NOT_AFFECTED, "xen-pv": Meltdown.XEN_PV}[choice]


def _one_audit_source(ctx, image: str | None, ptdump_file: str | None, live: bool) -> None:
    if ptdump_file and image:
        raise UsageError("give an IMAGE or --ptdump, not both")
    if live and (image or ptdump_file):
        raise UsageError(f"give {'an IMAGE' if image else '--ptdump'} or --live, not both")
    if not ptdump_file and not image and not live:
        raise UsageError("give an IMAGE to audit, --ptdump FILE, or --live")
    if ptdump_file:
        _refuse(ctx, IMAGE_OPTIONS, "only with an IMAGE, not with --ptdump")


def _audit_image(image: str, cr3: str | None, cpu: int | None, la57: bool | None, symbols, stated, out):
    """The audit of one image, its CR3 from the options or its notes."""
    from ptilab.audit.image import audit_image

    mem, value, geometry = _open_image_and_cr3(image, cr3, cpu, la57)
    return audit_image(mem, image, value, geometry, symbols, stated, busy=out.busy)


def _audit_images(ctx, images, cpu, la57, symbols, stated, threshold, as_json, scheduler, workers) -> None:
    from ptilab.report.tables import audit_images_table
    from ptilab.scan.batch import ImageError, audit_images

    rows = audit_images(images, cpu, la57, symbols, stated, scheduler, workers)
    errors = [r for r in rows if isinstance(r, ImageError)]
    failed = any(f.severity >= threshold for r in rows if not isinstance(r, ImageError) for f in r.findings)
    ctx.meta[EXIT_META] = 2 if errors else 1 if failed else 0
    out = _out()
    if as_json:
        out.json([r.as_dict() for r in rows])
    else:
        out.table(audit_images_table(rows))
    _exit_batch(ctx, errors, failed)


def _exit_batch(ctx, errors: list, failed: bool) -> None:
    """Several images: each unreadable one is a line on stderr and exit 2; else 1 if any failed."""
    for err in errors:
        click.echo(f"ptilab: error: {err.message}", err=True)
    if errors:
        ctx.exit(2)
    if failed:
        ctx.exit(1)


@cli.command("scan")
@click.argument("images", metavar="IMAGE...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--la57", is_flag=True, default=None,
              help="5-level paging (default: CR4.LA57 from the core's notes or VMCOREINFO, else 4).")
@click.option("--fail-on", default="medium", show_default=True, metavar="SEVERITY",
              help="Exit 1 if an address space has a finding at least this severe.")
@cpu_meltdown_option
@json_option
@_with_cluster_options
@click.pass_context
def scan_command(ctx, images, la57, fail_on, cpu_meltdown, as_json, scheduler, workers) -> None:
    """Find every address space in an image without symbols, and audit each:
    the PGDs whose kernel half is the kernel's (Linux copies init_mm's into
    every mm), as PTI pairs (kernel PGD, user PGD at +4 KiB) or single PGDs.

    The reference kernel half comes from a CPU's CR3 in the core, else
    VMCOREINFO's init_top_pgt (the note, or the copy found in RAM), else a
    census: of the halves that repeat with their tables in memory, the one
    mapping the most slots (not the most frequent: every PTI user PGD's half
    repeats almost as often). A process whose user PGD maps kernel memory
    shows here even when it was on no CPU. A large image (its chunks spread
    over the workers), or several images worth it, run on a local cluster of
    worker processes, or on --scheduler's.

    \b
    Examples:
      ptilab scan guest.core
      ptilab scan guest.core --json | jq '.address_spaces[].user_pgd'
      ptilab scan fleet/*.core --fail-on high
      ptilab scan big.raw --scheduler tcp://10.0.0.5:8786
    """
    from ptilab.audit.findings import Severity
    from ptilab.report.tables import scan_table
    from ptilab.scan.batch import ImageError, scan_images

    threshold = Severity.parse(fail_on)
    scans = scan_images(images, la57, scheduler, workers, stated=_stated_exposure(cpu_meltdown))
    errors = [s for s in scans if isinstance(s, ImageError)]
    done = [s for s in scans if not isinstance(s, ImageError)]
    failed = any(s.failed(threshold) for s in done)
    ctx.meta[EXIT_META] = 2 if errors else 1 if failed else 0
    out = _out()
    if as_json:
        out.json([s.as_dict() for s in scans] if len(images) > 1 else scans[0].as_dict())
    else:
        from ptilab.report.tables import machine_lines
        out.table(scan_table(scans, len(images) > 1))
        for s in done:
            out.line(_scan_summary(s))
            for line in machine_lines(s.exposure):
                out.line(f"{s.path}: {line}" if len(images) > 1 else line)
    _exit_batch(ctx, errors, failed)


def _scan_summary(s) -> str:
    kinds = {}
    for space in s.spaces:
        kinds[space.kind] = kinds.get(space.kind, 0) + 1
    worst = max((sp.worst for sp in s.spaces if sp.worst is not None), default=None)
    rate = s.bytes_read / (1 << 30) / s.seconds if s.seconds else 0
    holes = f" ({s.bytes_read / (1 << 30):.1f} GiB of data, holes skipped)" if s.bytes_read < s.bytes_scanned else ""
    return (f"{s.path}: {len(s.spaces)} page-table roots ("
            + ", ".join(f"{n} {kind}" for kind, n in kinds.items()) + ")"
            + f"; worst {worst.name.lower() if worst is not None else 'none'}"
            + (f"; {len(s.rejected)} candidate(s) rejected: tables that do not walk cleanly" if s.rejected else "")
            + f"; reference: {s.reference.source}, {s.reference.geometry.levels}-level, "
            + f"PTI {'on' if s.reference.pti else 'off'}; "
            + f"{s.bytes_scanned / (1 << 30):.1f} GiB{holes} in {s.seconds:.2f} s ({rate:.1f} GiB/s read)")


def _audit_live(ctx: click.Context, root: str, cr3: str | None, symbols: dict[str, int] | None, stated, out: Output):
    """The audit of the running kernel."""
    from pathlib import Path

    from ptilab.audit.image import audit_running_kernel
    from ptilab.audit.live import live_symbols

    kernel = _open_live(ctx, root)
    with out.busy("walking the running kernel's page tables"):
        return audit_running_kernel(kernel, symbols or live_symbols(Path(root)),
                                    None if cr3 is None else _parse_cr3(cr3), stated)


@cli.command("dump")
@click.argument("image", required=False, type=click.Path(dir_okay=False))
@_with_image_options
@live_option
@click.option("--format", "fmt", type=click.Choice(["ptdump", "qemu", "json"]), default="ptdump", show_default=True,
              help="Linux ptdump text, QEMU monitor 'info mem' text, or JSON.")
@click.option("--json", "as_json", is_flag=True, help="The same as --format json.")
@click.option("--system-map", type=click.Path(dir_okay=False), default=None,
              help="/proc/kallsyms (or System.map) of this boot: ptdump's KASLR markers read from page_offset_base, "
                   "vmalloc_base and vmemmap_base. Default: inferred from the kernel page tables.")
@click.option("--kaslr-bases", default=None, metavar="PAGE_OFFSET,VMALLOC,VMEMMAP",
              help="ptdump's KASLR markers at these hexadecimal bases instead.")
@click.pass_context
def dump(ctx, image, cr3, cpu, la57, live, fmt, as_json, system_map, kaslr_bases) -> None:
    """Print the page tables a CR3 points at, as Linux's ptdump or QEMU's
    'info mem' would show them. Tables that are malformed, or that no CPU
    could run on (no executable kernel page: a wrong --cr3), are printed
    all the same, said on stderr ("ptilab: warning: ...") and exit 1.

    \b
    Examples:
      ptilab dump guest.core                      # a user-mode CPU's tables, ptdump style
      ptilab dump guest.core --cpu 1 --format qemu
      ptilab dump mem.raw --cr3 61d9000 --json
      sudo ptilab dump --live                     # the running kernel's user tables (init_mm's)
      sudo ptilab dump --live --cr3 2a10000       # any PGD, by physical address
    """
    from ptilab.paging import walk

    if as_json:
        if fmt != "json" and _given(ctx, "fmt"):
            raise UsageError(f"--json and --format {fmt}: give one")
        fmt = "json"
    if bool(image) == bool(live):
        raise UsageError("give an IMAGE to dump, or --live")
    symbols = _symbols(system_map)
    if live:
        from pathlib import Path

        from ptilab.audit.live import live_symbols
        kernel = _open_live(ctx, live)
        mem, geometry = kernel.kcore, kernel.geometry
        symbols = symbols or live_symbols(Path(live))  # ptdump's markers from the kernel's own bases
        # Without --cr3: the user half of init_mm's pair, what user mode runs on (the kernel PGD without PTI).
        from ptilab.linux.pti_pair import find_pti_pair
        pair = find_pti_pair(mem, kernel.info.kernel_pgd, geometry)
        value = _parse_cr3(cr3) if cr3 is not None else (pair.user_pgd if pair.is_pti else pair.kernel_pgd)
    else:
        mem, value, geometry = _open_image_and_cr3(image, cr3, cpu, la57)
    out = _out()
    with out.busy("walking the page tables"):
        w = walk(mem, value, geometry)
        markers = None
        if fmt == "ptdump":
            from ptilab.formats.ptdump import linux_markers
            bases, espfix = _image_layout(mem, value, geometry, symbols, _kaslr_bases(kaslr_bases))
            markers = linux_markers(geometry, *bases, espfix=espfix)
    warnings = _dump_warnings(w)
    ctx.meta[EXIT_META] = 1 if warnings else 0
    _print_dump(out, w, fmt, markers)
    for warning in warnings:
        click.echo(f"ptilab: warning: {warning}", err=True)
    if warnings:
        ctx.exit(1)


@cli.command("log")
@click.argument("image", required=False, type=click.Path(dir_okay=False))
@live_option
@json_option
@click.pass_context
def log_command(ctx, image, live, as_json) -> None:
    """Print the kernel's log (its printk ring, Linux 5.10 and later) out of a
    dump, as makedumpfile --dump-dmesg and dmesg print it: one line per
    message, "[    0.123456] text". The ring is found through the dump's
    VMCOREINFO alone: no debug info needed. --json gives each message's seq,
    time, level, facility, caller and text.

    \b
    Examples:
      ptilab log vmcore                        # a kdump vmcore, QEMU or makedumpfile dump
      ptilab log guest.core | grep -i 'page tables isolation'
      ptilab log guest.core --json
      sudo ptilab log --live                   # the running kernel's, through /proc/kcore
    """
    from ptilab.linux.printk import format_dmesg, image_vmcoreinfo, read_ring

    if bool(image) == bool(live):
        raise UsageError("give an IMAGE to read the log of, or --live")
    if live:
        kernel = _open_live(ctx, live)
        mem, info, source = kernel.kcore, kernel.info, kernel.kcore.path
    else:
        from ptilab.memory.images import open_image

        _refuse_text_image(image)
        mem, source = open_image(image), image
        info = image_vmcoreinfo(mem, image)
    out = _out()
    with out.busy("reading the kernel's log"):
        log = read_ring(mem, info)
    if as_json:
        out.json({"source": source, "osrelease": info.osrelease, "skipped_descriptors": log.skipped,
                  "records": [r.as_dict() for r in log.records]})
        return
    out.text(format_dmesg(log.records))


def _dump_warnings(w) -> list[str]:
    """What audit would flag as TABLE-* and TABLES-NO-ENTRY, in a line each."""
    from ptilab.audit.checks import entry_mapped

    found = [f"malformed page tables: {a.detail}" for a in w.anomalies]
    if not entry_mapped(w.distinct, w.geometry):
        found.append(f"CR3 {w.cr3.pgd:#x}: these tables map no executable kernel page, so no CPU could run on them "
                     f"(a wrong --cr3, or not page tables)")
    return found


def _print_dump(out: Output, w, fmt: str, markers) -> None:
    if fmt == "json":
        from ptilab.formats.jsonout import walk_to_dict
        out.json(walk_to_dict(w))
    elif fmt == "qemu":
        from ptilab.formats.qemu import format_info_mem
        out.text(format_info_mem(w))
    else:
        from ptilab.formats.ptdump import format_walk
        out.text(format_walk(w, markers))


def _kaslr_bases(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        bases = tuple(int(part, 16) for part in text.split(","))
    except ValueError:
        bases = ()
    if len(bases) != 3:
        raise UsageError(f"--kaslr-bases takes three hexadecimal addresses, PAGE_OFFSET,VMALLOC,VMEMMAP, not {text!r}")
    return bases


def _image_layout(mem, cr3: int, geometry, symbols: dict[str, int] | None, given: tuple[int, int, int] | None):
    """ptdump's KASLR bases and whether the kernel has ESPfix: the bases given,
    else read through the symbols, else inferred from the kernel view's tables."""
    from ptilab.linux.memory_layout import NOKASLR_BASES, has_espfix, layout_from_symbols, layout_from_tables
    from ptilab.linux.pti_pair import find_pti_pair
    from ptilab.paging import walk

    pair = find_pti_pair(mem, cr3, geometry)
    kernel_pgd = pair.kernel_pgd if pair.is_pti else cr3
    kernel = walk(mem, kernel_pgd, geometry, top_slots=(256, 512))
    if given:
        return given, has_espfix(kernel)
    layout = layout_from_symbols(mem, kernel_pgd, geometry, symbols or {}) or layout_from_tables(kernel)
    bases = layout.bases() if layout else NOKASLR_BASES[geometry.levels]
    return tuple(bases.values()), has_espfix(kernel)


@cli.command("report")
@click.argument("out_file", metavar="OUT", type=click.Path(dir_okay=False))
@kernel_option
@cpus_option
@paging_option
@click.option("--design", "designs", default="all", show_default=True, metavar="DESIGN[,DESIGN...]",
              shell_complete=_complete_from(lambda: ["all", *_design_names()], listed=True),
              help="The designs to boot and show: one for a simulation, several (or all) for a comparison.")
@click.option("--image", default=None, type=click.Path(dir_okay=False), metavar="CORE",
              help="Report an audit of this ELF core or raw image instead of comparing the designs.")
@click.option("--cr3", default=None, metavar="HEX", help="With --image: the CR3 to judge "
              "(default: from the core's QEMU notes, a CPU in user mode first).")
@click.option("--system-map", type=click.Path(dir_okay=False), default=None,
              help="With --image: System.map or /proc/kallsyms text, to name the entry text.")
@cpu_meltdown_option
@click.option("--json", "as_json", is_flag=True,
              help='Print {"wrote": OUT, "bytes": N, ...} instead of the "wrote" line.')
@click.pass_context
def report(ctx: click.Context, out_file: str, profile: str, cpus: int, levels: str, designs: str,
           image: str | None, cr3: str | None, system_map: str | None, cpu_meltdown: str | None,
           as_json: bool) -> None:
    """Write OUT as one self-contained HTML page (inline CSS and SVG, no
    network): the designs compared on a modelled kernel, or the audit of an
    image. Both show the user and kernel views as an address-space map and
    the page-table tree behind the cpu_entry_area, espfix, entry text and
    cpu_tss_rw, with the tables both PGDs share highlighted; designs also
    get the cost model's TLB-refill table and plot. OUT is written whole or
    not at all.

    \b
    Examples:
      ptilab report designs.html                            # linux-6.1, 4 CPUs, 4-level
      ptilab report k2017.html --kernel kaiser-2017 --cpus 2
      ptilab report shared.html --design shared-pmd --paging 5   # one design: a simulation
      ptilab report audit.html --image tests/realkernel/out/pti-4level/core.elf
      ptilab report audit.html --image mem.raw --cr3 61d9000 --json
    """
    out = _out()
    with atomic_file(out_file) as tmp:
        what = _write_report(ctx, tmp, out, profile, cpus, levels, designs, image, cr3, system_map, cpu_meltdown)
    size = os.path.getsize(out_file)
    if as_json:
        out.json({"wrote": out_file, "bytes": size, **what})
    else:
        out.info(f"wrote {out_file} ({size // 1024} KiB)")


def _write_report(ctx: click.Context, path: str, out: Output, profile: str, cpus: int, levels: str, designs: str,
                  image: str | None, cr3: str | None, system_map: str | None, cpu_meltdown: str | None) -> dict:
    """Write the report's page to path; what it reports, for --json."""
    if image:
        _refuse(ctx, ("profile", "cpus", "levels", "designs"), "only for a modelled kernel, not with --image")
        from ptilab.audit.image import audit_image
        from ptilab.report.html import audit_report
        mem, value, geometry = _open_image_and_cr3(image, cr3, None, None)
        result = audit_image(mem, image, value, geometry, _symbols(system_map), _stated_exposure(cpu_meltdown),
                             busy=out.busy)
        page = audit_report(result, mem)
        what = {"report": "audit", "subject": result.subject}
    else:
        _refuse(ctx, ("cr3", "system_map", "cpu_meltdown"), "only with --image")
        from ptilab.report.html import comparison_report
        chosen = _design_list(designs)
        page = comparison_report(profile, cpus, _levels(levels), chosen)
        what = {"report": "designs", "kernel": profile, "cpus": cpus, "paging": int(levels), "designs": chosen}
    with open(path, "wb") as f:
        f.write(page.encode())
    return what


@cli.command("meltdown")
@click.argument("image", required=False, type=click.Path(dir_okay=False))
@_with_image_options
@click.option("--system-map", type=click.Path(dir_okay=False), default=None,
              help="System.map or /proc/kallsyms text (unslid) to turn IDT handlers into a KASLR slide.")
@_design_option("Without IMAGE: the modelled design to attack.")
@kernel_option
@cpus_option
@paging_option
@json_option
@click.pass_context
def meltdown(ctx, image, cr3, cpu, la57, system_map, design, profile, cpus, levels, as_json) -> None:
    """What a Meltdown attacker in user mode reads through the user tables,
    and which kernel pointers (IDT handlers, TSS stacks, GDT base) and KASLR
    offsets that reveals; of a real image, or of a modelled design.

    \b
    Examples:
      ptilab meltdown                               # the linux design on linux-6.1
      ptilab meltdown --design explicit --kernel kaiser-2017
      ptilab meltdown guest.core --system-map System.map --json
    """
    from ptilab.mmu.meltdown import exposure, kernel_exposure

    out = _out()
    if image:
        _refuse(ctx, ("design", "profile", "cpus", "levels"), "only for a modelled kernel, not with an IMAGE")
        from ptilab.audit.sources import views_from_image
        symbols = _symbols(system_map)
        mem, value, geometry = _open_image_and_cr3(image, cr3, cpu, la57)
        with out.busy("walking the page tables"):
            found = views_from_image(mem, value, geometry)
            result = exposure(mem, found.user, symbols)
    else:
        _refuse(ctx, (*IMAGE_OPTIONS, "system_map"), "only with an IMAGE")
        from ptilab.pti import boot
        result = kernel_exposure(boot(profile, design, cpus, _levels(levels)))
    if as_json:
        out.json(result.as_dict())
        return
    from rich.table import Table
    t = Table(title="Readable through the user tables (Meltdown ignores the US bit)")
    for col in ("start", "end", "region", "pages", "frames", "rights"):
        t.add_column(col)
    for r in result.readable:
        t.add_row(f"{r.start:#x}", f"{r.end:#x}", r.region, str(r.pages), str(r.frames),
                  ("RW" if r.writable else "ro") + (" x" if r.executable else " NX"))
    out.table(t)
    for leak in result.leaks:
        out.line(f"{leak.source} at {leak.va:#x}: {leak.value:#x} = {leak.meaning}")
    if result.text_base is not None:
        out.line(f"kernel text base {result.text_base:#x}"
                 + (f", KASLR slide {result.kaslr_slide:#x}" if result.kaslr_slide is not None else ""))
    for note in result.notes:
        out.line(note)


# -- boot: a kernel under QEMU, frozen in user mode, then audited ---------------

@cli.command("boot")
@click.argument("vmlinuz", metavar="VMLINUZ", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for core.elf (~RAM size), QEMU's walk (cpuN.info_mem/info_tlb), console.txt, boot.json.")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True,
              help="auto: KVM if it brings the kernel to its first console line within seconds, else TCG.")
@click.option("--cpu", "cpu_model", default="qemu64,vendor=GenuineIntel", show_default=True, metavar="MODEL",
              help="QEMU's -cpu (the default is an Intel CPU the kernel deems Meltdown-affected: PTI on).")
@click.option("--smp", type=click.IntRange(1, 64), default=2, show_default=True, help="CPUs.")
@click.option("--mem", "memory", default="256M", show_default=True, metavar="SIZE", help="Guest RAM (QEMU's -m).")
@click.option("--append", default="", metavar="ARGS", help="More kernel command line (nopti, pti=on, mitigations=off...).")
@click.option("--la57", is_flag=True, help="5-level paging (-cpu MODEL,+la57).")
@click.option("--kaslr/--nokaslr", default=True, show_default=True, help="Leave KASLR to the kernel, or boot nokaslr.")
@click.option("--timeout", type=click.FloatRange(min=1), default=300, show_default=True, metavar="S",
              help="Deadline from QEMU's start to the core written.")
@click.option("--fail-on", default="medium", show_default=True, metavar="SEVERITY",
              help="As audit: exit 1 if a finding is at least this severe.")
@json_option
@click.pass_context
def boot_command(ctx, vmlinuz, out_dir, accel, cpu_model, smp, memory, append, la57, kaslr, timeout, fail_on,
                 as_json) -> None:
    """Boot a kernel under QEMU, freeze it with a CPU in user mode, write the
    ELF core, QEMU's own page walk and the console log to --out, and audit the
    core exactly as `ptilab audit DIR/core.elf` would (same findings, JSON and
    exit codes).

    VMLINUZ is a bzImage (a kernel tree's arch/x86/boot/bzImage, an installed
    /boot/vmlinuz-*) or a Debian kernel package (.deb). The initramfs is a
    static busybox (apt-get install busybox-static) that keeps every CPU in
    a user-mode loop; the kernel's own qemu_fw_cfg module, when its modules
    are at hand, puts VMCOREINFO in the core.

    Exit code 0: nothing at or above --fail-on; 1: found; 2: bad input, or a
    kernel that panics, never reaches user mode or prints nothing.

    \b
    Examples:
      ptilab boot arch/x86/boot/bzImage --out /tmp/boot
      ptilab boot linux-image-6.1.0-57-amd64_6.1.192-3_amd64.deb --out /tmp/boot --append nopti
      ptilab boot /boot/vmlinuz-$(uname -r) --out /tmp/boot --cpu EPYC --json
    """
    import tempfile
    from pathlib import Path

    from ptilab.audit.findings import Severity
    from ptilab.guest.capture import BootRequest, capture
    from ptilab.guest.image import kernel_image

    Severity.parse(fail_on)  # refused before a minute of boot
    if not re.fullmatch(r"[1-9]\d*[MG]?", memory):
        raise UsageError(f"--mem takes a size such as 256M or 1G, not {memory!r}")
    out = _out()
    request = BootRequest(cpu_model, memory, smp, accel, append, la57, kaslr, timeout)
    with tempfile.TemporaryDirectory(prefix="ptilab-boot-") as work:
        image = kernel_image(Path(vmlinuz), Path(work) / "deb")
        done = capture(image, Path(out_dir), request, Path(work))
    said = (f"booted {done.release or vmlinuz} under {done.accel.upper()} ({done.accel_reason}): "
            f"CPU {done.user_cpu} in user mode {done.seconds['probe'] + done.seconds['ready']:.0f} s after start; "
            f"{done.core}, QEMU's walk and console.txt in {out_dir}")
    if as_json:
        if not out.quiet:
            click.echo(f"ptilab: {said}", err=True)
    else:
        out.info(said)
    # The audit command itself, so that boot follows whatever audit does with a core.
    ctx.invoke(audit_command, images=(str(done.core),), fail_on=fail_on, as_json=as_json)


# -- ptilab diff: what B's user tables expose that A's do not -----------------------

@cli.command("diff")
@click.argument("a", metavar="A")
@click.argument("b", metavar="B", required=False)
@click.option("--cr3-a", default=None, metavar="HEX", help="A is an image: the CR3 to judge (default: as audit picks it).")
@click.option("--cr3-b", default=None, metavar="HEX", help="B is an image (or --live): the CR3 to judge.")
@click.option("--system-map-a", type=click.Path(dir_okay=False), default=None,
              help="System.map or /proc/kallsyms of A's boot, to name its entry text and kernel text clone.")
@click.option("--system-map-b", type=click.Path(dir_okay=False), default=None, help="The same for B.")
@click.option("--live", default=None, is_flag=False, flag_value="/", metavar="[ROOT]",
              help="B is the running kernel, through /proc/kcore (root only), as audit --live reads it.")
@json_option
@click.pass_context
def diff_command(ctx, a, b, cr3_a, cr3_b, system_map_a, system_map_b, live, as_json) -> None:
    """What the user tables of B map of the kernel that A's do not, and
    every right B widens (writable, executable, user, global), named by
    region (direct map, kernel text, cpu_entry_area piece, entry text,
    espfix, cpu_tss_rw...). A region that moved between boots (a KASLR
    slide, page_offset_base, the random cpu_entry_area slots of 6.2+) but
    maps as much with the same rights is a move, not an exposure. Also
    what B no longer maps.

    A and B: an image (ELF core, kdump, LiME, raw: CR3 as audit picks it),
    ptdump text (as audit --ptdump reads it), or a modelled boot spelled
    model:PROFILE:DESIGN[:CPUS[:LEVELS]]; --live makes B the running kernel.

    Exit code 0: B exposes nothing A does not; 1: it does (a CI gate); 2: bad input.

    \b
    Examples:
      ptilab diff release.core candidate.core
      ptilab diff last-release.ptdump candidate.core --json
      ptilab diff model:linux-6.1:linux model:linux-6.1:explicit
      sudo ptilab diff last-release.ptdump --live
    """
    from ptilab.compare.viewdiff import diff_views
    from ptilab.report.tables import view_diff_table

    if (b is None) == (live is None):
        raise UsageError("give two views, A and B, or A and --live (B: the running kernel)")
    out = _out()
    side_a = _diff_side(ctx, a, cr3_a, system_map_a, "a", out)
    side_b = _diff_side(ctx, b, cr3_b, system_map_b, "b", out) if b else _diff_live_side(ctx, live, cr3_b,
                                                                                          system_map_b, out)
    result = diff_views(side_a, side_b)
    ctx.meta[EXIT_META] = 1 if result.exposes_more else 0
    if as_json:
        out.json(result.as_dict())
    else:
        out.line(f"A: {result.a}")
        out.line(f"B: {result.b}")
        for note in result.notes:
            out.line(note)
        if result.exposed or result.moved or result.gone:
            out.table(view_diff_table(result))
        out.line(_diff_verdict(result))
    if result.exposes_more:
        ctx.exit(1)


def _diff_side(ctx, spec: str, cr3: str | None, system_map: str | None, which: str, out: Output):
    """One side of a diff: a model boot, ptdump text or an image."""
    from ptilab.audit.sources import MODEL_PREFIX, views_from_image, views_from_model, views_from_ptdump
    from ptilab.compare.viewdiff import Side

    symbols = _symbols(system_map)
    if spec.startswith(MODEL_PREFIX) and not os.path.exists(spec):
        _refuse(ctx, (f"cr3_{which}", f"system_map_{which}"), "only for an image or ptdump text, not a model boot")
        views, kernel = views_from_model(spec)
        return Side(f"{spec} ({kernel.geometry.levels}-level)", views.geometry, views.user, views.user_copies,
                    {}, kernel.profile)
    if _is_text(spec):
        _refuse(ctx, (f"cr3_{which}",), "only for an image, not ptdump text")
        views = views_from_ptdump(spec, symbols)
        return Side(f"{spec} (ptdump, {views.geometry.levels}-level)", views.geometry, views.user,
                    views.user_copies, views.symbols)
    mem, value, geometry = _open_image_and_cr3(spec, cr3, None, None)
    with out.busy(f"walking the page tables of {spec}"):
        found = views_from_image(mem, value, geometry, symbols)
    return Side(f"{spec} (CR3 {value:#x}, {geometry.levels}-level)", geometry, found.views.user,
                found.views.user_copies, found.views.symbols)


def _is_text(path: str) -> bool:
    """A file whose first KiB is text (ptdump), not a memory image."""
    try:
        _refuse_text_image(path)
    except InputError:
        return os.path.isfile(path)
    return False


def _diff_live_side(ctx, root: str, cr3: str | None, system_map: str | None, out: Output):
    from pathlib import Path

    from ptilab.audit.live import live_symbols, live_views
    from ptilab.compare.viewdiff import Side

    kernel = _open_live(ctx, root)
    with out.busy("walking the running kernel's page tables"):
        found = live_views(kernel, _symbols(system_map) or live_symbols(Path(root)),
                           None if cr3 is None else _parse_cr3(cr3))
    return Side(f"the running kernel {kernel.info.osrelease} ({kernel.geometry.levels}-level)", kernel.geometry,
                found.views.user, found.views.user_copies, found.views.symbols)


def _diff_verdict(result) -> str:
    if result.exposes_more:
        regions = sorted({c.region for c in result.exposed})
        return f"B exposes more than A: {', '.join(regions)} (exit 1)"
    moved = f"; {len(result.moved)} region(s) moved, exposing nothing more" if result.moved else ""
    return f"B exposes nothing that A does not{moved}"


SHELLS = ("bash", "zsh", "fish")


@cli.command("completion")
@click.argument("shell", type=click.Choice(SHELLS), metavar="SHELL")
def completion(shell: str) -> None:
    """Print the shell code that completes ptilab's commands and options,
    kernel profiles, designs and workloads included.

    \b
    Examples:
      eval "$(ptilab completion bash)"                  # in ~/.bashrc
      eval "$(ptilab completion zsh)"                   # in ~/.zshrc
      ptilab completion fish > ~/.config/fish/completions/ptilab.fish
    """
    from click.shell_completion import get_completion_class

    complete = get_completion_class(shell)(cli, {}, "ptilab", COMPLETE_VAR)
    _out().text(complete.source())


GLOBAL_OPTIONS = ("-q", "--quiet", "--color", "--no-color")


class Terminated(BaseException):
    """SIGTERM, raised where the program is so that files being written are
    cleaned up on the way out, as for Ctrl-C (the default action would kill
    the process and leave the temporary behind)."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one line on stderr and a documented exit code on error.

    Exit codes: 0 success; 1 the audit found something at or above the chosen
    severity; 2 bad usage or bad input; 130 interrupted; 143 terminated.
    """
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        code = cli.main(args=argv, prog_name="ptilab", complete_var=COMPLETE_VAR, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("ptilab: interrupted", err=True)
        sys.exit(130)
    except Terminated:
        click.echo("ptilab: terminated", err=True)
        sys.exit(128 + signal.SIGTERM)
    except click.exceptions.NoSuchOption as err:
        hint = ""
        if err.option_name in GLOBAL_OPTIONS:
            hint = f"; {err.option_name} is ptilab's own option: put it before the command (ptilab {err.option_name} COMMAND)"
        click.echo(f"ptilab: error: {err.format_message().rstrip('.') if hint else err.format_message()}{hint}",
                   err=True)
        sys.exit(2)
    except click.ClickException as err:
        click.echo(f"ptilab: error: {err.format_message()}", err=True)
        sys.exit(2)
    except PtilabError as err:
        click.echo(f"ptilab: error: {err}", err=True)
        sys.exit(err.exit_code)
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
