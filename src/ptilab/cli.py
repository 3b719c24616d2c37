"""The `ptilab` command: parse arguments, call the API, print. Nothing else."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console

from ptilab.errors import PtilabError

DEFAULT_PROFILE = "linux-6.1"
DEFAULT_CPUS = 4


def _console() -> Console:
    return Console(soft_wrap=False, width=None if sys.stdout.isatty() else 200)


def _emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=lambda o: getattr(o, "value", str(o))))


kernel_option = click.option("--kernel", "profile", default=DEFAULT_PROFILE, show_default=True, metavar="PROFILE",
                             help="Kernel layout profile: kaiser-2017, linux-4.15 or linux-6.1.")
cpus_option = click.option("--cpus", default=DEFAULT_CPUS, show_default=True, type=int,
                           help="NR_CPUS (possible CPUs), 1 to 8192.")
paging_option = click.option("--paging", "levels", default="4", show_default=True, metavar="4|5",
                             help="Paging levels: 4 (PML4) or 5 (LA57).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


def _levels(text: str) -> int:
    if text not in ("4", "5"):
        raise PtilabError(f"--paging must be 4 or 5, not {text!r}")
    return int(text)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ptilab")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """ptilab: x86-64 kernel page-table isolation (KAISER / Linux PTI), executable.

    Under PTI the kernel runs on one page-table tree and user space on a
    second, nearly empty one that must still map the cpu_entry_area. ptilab
    models the three designs weighed in the KAISER review (explicit, mirror,
    shared-pmd) and what Linux shipped (linux), and compares them.

    With no command, compares all designs on linux-6.1 with 4 CPUs.

    \b
    Examples:
      ptilab                                  # compare designs on the default kernel
      ptilab compare --kernel kaiser-2017 --cpus 64
      ptilab simulate --design shared-pmd --cpus 2 --view user
      ptilab layout-change --kernel linux-6.1
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(compare)


@cli.command()
@kernel_option
@cpus_option
@paging_option
@json_option
def compare(profile: str, cpus: int, levels: str, as_json: bool) -> None:
    """Compare every design: memory, writes, AP work, allocator legality,
    table sharing and the user view of the cpu_entry_area against the kernel's.

    \b
    Examples:
      ptilab compare
      ptilab compare --kernel linux-4.15 --cpus 64 --paging 5 --json
    """
    from ptilab.compare.metrics import compare as run_compare
    from ptilab.report.tables import compare_table

    reports = run_compare(profile, cpus, _levels(levels))
    if as_json:
        _emit_json([r.as_dict() for r in reports])
    else:
        _console().print(compare_table(reports))


@cli.command("layout-change")
@kernel_option
@cpus_option
@paging_option
@json_option
def layout_change(profile: str, cpus: int, levels: str, as_json: bool) -> None:
    """Change the kernel's cpu_entry_area layout (a new piece, the TSS's
    rights, guard pages) and report which designs stay correct unmodified.

    \b
    Example:
      ptilab layout-change --kernel kaiser-2017 --cpus 2
    """
    from ptilab.compare.layout_change import run
    from ptilab.report.tables import layout_change_table

    outcomes = run(profile, cpus, _levels(levels))
    if as_json:
        _emit_json([o.__dict__ for o in outcomes])
    else:
        _console().print(layout_change_table(outcomes, profile))


@cli.command()
@click.option("--design", default="linux", show_default=True, metavar="DESIGN",
              help="explicit, mirror, shared-pmd or linux.")
@kernel_option
@cpus_option
@paging_option
@click.option("--view", type=click.Choice(["user", "kernel", "both"]), default="both", show_default=True,
              help="Which half of the PGD pair to print.")
@json_option
def simulate(design: str, profile: str, cpus: int, levels: str, view: str, as_json: bool) -> None:
    """Boot a modelled kernel with one design and print its page tables in
    Linux ptdump format (as /sys/kernel/debug/page_tables/current_user and
    current_kernel would show them).

    \b
    Examples:
      ptilab simulate --design explicit --kernel kaiser-2017 --cpus 2
      ptilab simulate --design linux --paging 5 --view user --json
    """
    from ptilab.linux.kernel import boot
    from ptilab.paging import walk

    kernel = boot(profile, design, cpus, _levels(levels))
    from ptilab.formats.ptdump import format_walk, linux_markers

    views = {"user": kernel.user_cr3(), "kernel": kernel.kernel_cr3()}
    chosen = ["user", "kernel"] if view == "both" else [view]
    walks = {name: walk(kernel.ram, views[name], kernel.geometry) for name in chosen}
    if as_json:
        from ptilab.formats.jsonout import walk_to_dict
        _emit_json({name: walk_to_dict(w) for name, w in walks.items()})
        return
    for name, w in walks.items():
        title = "current_user" if name == "user" else "current_kernel"
        click.echo(f"# {title}: design {design}, {profile}, {cpus} CPUs, {kernel.geometry.levels}-level, "
                   f"CR3 {w.cr3}")
        click.echo(format_walk(w, linux_markers(kernel.geometry)), nl=False)


@cli.command("cost")
@kernel_option
@click.option("--cpus", "cpus_list", default=str(DEFAULT_CPUS), show_default=True, metavar="N[,N...]",
              help="NR_CPUS; several, comma-separated, sweep them (and plot against them).")
@paging_option
@click.option("--pcid/--no-pcid", default=True, show_default=True,
              help="CR4.PCIDE: PTI's PCID pair with NOFLUSH switches, or every CR3 write flushing.")
@click.option("--design", "designs", default="all", show_default=True, metavar="DESIGN[,DESIGN...]",
              help="explicit, mirror, shared-pmd, linux, or off (PTI off: the baseline); 'all' is all five.")
@click.option("--workload", "workloads", multiple=True, metavar="NAME|FILE.toml",
              help="syscall, interrupt, nmi, context-switch, or your own TOML file; repeatable. Default: all shipped.")
@click.option("--cpu", type=int, default=0, show_default=True, help="The CPU whose cpu_entry_area the workloads use.")
@json_option
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Also write a PNG or SVG of the refill cost against NR_CPUS and per design (needs matplotlib).")
def cost_command(profile: str, cpus_list: str, levels: str, pcid: bool, designs: str, workloads: tuple[str, ...],
                 cpu: int, as_json: bool, plot_file: str | None) -> None:
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
    from ptilab.mmu.cost import PTI_OFF, sweep
    from ptilab.pti import DESIGNS
    from ptilab.report.tables import refill_table

    try:
        cpus = [int(n) for n in cpus_list.split(",")]
    except ValueError:
        raise PtilabError(f"--cpus must be numbers separated by commas, not {cpus_list!r}") from None
    chosen = [*DESIGNS, PTI_OFF] if designs == "all" else designs.split(",")
    costs = sweep(profile, cpus, chosen, _levels(levels), list(workloads) or None, pcid, cpu)
    if plot_file:
        from ptilab.report.plots import plot_refill
        plot_refill(costs, plot_file)
    if as_json:
        _emit_json([c.as_dict() for c in costs])
    else:
        _console().print(refill_table(costs))
        if plot_file:
            click.echo(f"plot written to {plot_file}")


def _open_image_and_cr3(image: str, cr3: str | None, cpu: int | None, la57: bool | None):
    """The image, the CR3 to judge and the paging mode: from the options, or
    from QEMU's per-CPU notes in the core (a CPU in user mode first)."""
    from ptilab.memory.images import open_image
    from ptilab.paging import Geometry

    mem = open_image(image)
    cpus = getattr(mem, "cpus", ())
    if cr3 is None:
        if not cpus:
            raise PtilabError(f"{image} carries no CPU registers: give --cr3")
        if cpu is None:
            cpu = next((c.index for c in cpus if c.cpl == 3), 0)
        if not 0 <= cpu < len(cpus):
            raise PtilabError(f"--cpu {cpu}: the core holds CPUs 0 to {len(cpus) - 1}")
        state = cpus[cpu]
        value = state.cr3
        levels = 5 if la57 else state.geometry.levels
    else:
        try:
            value = int(cr3, 16)
        except ValueError:
            raise PtilabError(f"--cr3 must be hexadecimal, not {cr3!r}") from None
        levels = 5 if la57 else 4
    return mem, value, Geometry(levels)


image_options = [
    click.option("--cr3", default=None, metavar="HEX", help="CR3 to walk (PCID bits and bit 63 are ignored). "
                 "Default: from the core's QEMU notes, a CPU in user mode first."),
    click.option("--cpu", type=int, default=None, help="With a QEMU core: take this CPU's CR3 and CR4."),
    click.option("--la57", is_flag=True, default=None, help="5-level paging (default: CR4.LA57 from the core, else 4)."),
]


def _with_image_options(fn):
    for option in reversed(image_options):
        fn = option(fn)
    return fn


@cli.command("audit")
@click.argument("image", required=False, type=click.Path(dir_okay=False))
@_with_image_options
@click.option("--ptdump", "ptdump_file", type=click.Path(dir_okay=False), default=None,
              help="Audit Linux ptdump text (current_user, or kernel/current_kernel) instead of an image.")
@click.option("--system-map", type=click.Path(dir_okay=False), default=None,
              help="System.map or /proc/kallsyms text, to name the entry text (KASLR slide inferred).")
@click.option("--fail-on", default="medium", show_default=True, metavar="SEVERITY",
              help="Exit 1 if a finding is at least this severe: info, low, medium, high, critical.")
@json_option
def audit_command(image, cr3, cpu, la57, ptdump_file, system_map, fail_on, as_json) -> None:
    """Check a real kernel's page tables against PTI's promises: what the
    user tables expose of the kernel and with which rights.

    IMAGE is an ELF core (QEMU dump-guest-memory, kdump vmcore) or a raw
    physical image. Exit code 0: nothing at or above --fail-on; 1: found; 2: bad input.

    \b
    Examples:
      ptilab audit guest.core                     # CR3 of a user-mode CPU from the core
      ptilab audit mem.raw --cr3 61d9000 --system-map kallsyms.txt
      ptilab audit --ptdump current_user.txt --json
    """
    from ptilab.audit import audit
    from ptilab.audit.findings import Severity
    from ptilab.report.tables import findings_table

    threshold = Severity.parse(fail_on)
    symbols = None
    if system_map:
        from ptilab.formats.kallsyms import read_symbols
        symbols = read_symbols(system_map)
    if ptdump_file:
        if image:
            raise PtilabError("give an IMAGE or --ptdump, not both")
        from ptilab.audit.sources import views_from_ptdump
        views, subject = views_from_ptdump(ptdump_file, symbols), ptdump_file
        extra: dict = {}
    elif image:
        from ptilab.audit.sources import views_from_image
        mem, value, geometry = _open_image_and_cr3(image, cr3, cpu, la57)
        found = views_from_image(mem, value, geometry, symbols)
        views, subject = found.views, f"{image} (CR3 {value:#x}, {geometry.levels}-level)"
        extra = {"pti_pair": {"kernel_pgd": f"{found.pair.kernel_pgd:#x}", "user_pgd": f"{found.pair.user_pgd:#x}",
                              "is_pti": found.pair.is_pti, "reasons": list(found.pair.reasons)},
                 "kaslr_slide": None if found.kaslr_slide is None else f"{found.kaslr_slide:#x}"}
    else:
        raise PtilabError("give an IMAGE to audit, or --ptdump FILE")
    findings = audit(views)
    if as_json:
        from ptilab.formats.jsonout import ranges_to_list
        _emit_json({"subject": subject, **extra, "findings": [f.as_dict() for f in findings],
                    "user_view": ranges_to_list(views.user, views.geometry)})
    else:
        console = _console()
        if "pti_pair" in extra:
            pair = extra["pti_pair"]
            verdict = "a Linux PTI pair" if pair["is_pti"] else "not a PTI pair"
            console.print(f"PGD pair: kernel {pair['kernel_pgd']}, user {pair['user_pgd']}: {verdict}"
                          + (f"; KASLR slide {extra['kaslr_slide']}" if extra.get("kaslr_slide") else ""))
        console.print(findings_table(findings, f"PTI audit of {subject}"))
    if any(f.severity >= threshold for f in findings):
        sys.exit(1)


@cli.command("dump")
@click.argument("image", type=click.Path(dir_okay=False))
@_with_image_options
@click.option("--format", "fmt", type=click.Choice(["ptdump", "qemu", "json"]), default="ptdump", show_default=True,
              help="Linux ptdump text, QEMU monitor 'info mem' text, or JSON.")
def dump(image, cr3, cpu, la57, fmt) -> None:
    """Print the page tables a CR3 points at, as Linux's ptdump or QEMU's
    'info mem' would show them.

    \b
    Examples:
      ptilab dump guest.core                      # a user-mode CPU's tables, ptdump style
      ptilab dump guest.core --cpu 1 --format qemu
      ptilab dump mem.raw --cr3 61d9000 --format json
    """
    from ptilab.paging import walk

    mem, value, geometry = _open_image_and_cr3(image, cr3, cpu, la57)
    w = walk(mem, value, geometry)
    if fmt == "json":
        from ptilab.formats.jsonout import walk_to_dict
        _emit_json(walk_to_dict(w))
    elif fmt == "qemu":
        from ptilab.formats.qemu import format_info_mem
        click.echo(format_info_mem(w), nl=False)
    else:
        from ptilab.formats.ptdump import format_walk, linux_markers
        click.echo(format_walk(w, linux_markers(geometry)), nl=False)


@cli.command("report")
@click.argument("out", type=click.Path(dir_okay=False))
@kernel_option
@cpus_option
@paging_option
@click.option("--image", default=None, type=click.Path(dir_okay=False), metavar="CORE",
              help="Report an audit of this ELF core or raw image instead of comparing the designs.")
@click.option("--cr3", default=None, metavar="HEX", help="With --image: the CR3 to judge "
              "(default: from the core's QEMU notes, a CPU in user mode first).")
@click.option("--system-map", type=click.Path(dir_okay=False), default=None,
              help="With --image: System.map or /proc/kallsyms text, to name the entry text.")
@click.pass_context
def report(ctx: click.Context, out: str, profile: str, cpus: int, levels: str, image: str | None,
           cr3: str | None, system_map: str | None) -> None:
    """Write OUT as one self-contained HTML page (inline CSS and SVG, no
    network): the designs compared on a modelled kernel, or the audit of an
    image. Both show the user and kernel views as an address-space map and
    the page-table tree behind the cpu_entry_area, espfix, entry text and
    cpu_tss_rw, with the tables both PGDs share highlighted.

    \b
    Examples:
      ptilab report designs.html                            # linux-6.1, 4 CPUs, 4-level
      ptilab report k2017.html --kernel kaiser-2017 --cpus 2
      ptilab report audit.html --image tests/realkernel/out/pti-4level/core.elf
      ptilab report audit.html --image mem.raw --cr3 61d9000
    """
    from pathlib import Path

    from click.core import ParameterSource

    from ptilab.errors import InputError

    if image:
        given = [f"--{name.replace('levels', 'paging').replace('profile', 'kernel')}"
                 for name in ("profile", "cpus", "levels")
                 if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE]
        if given:
            raise PtilabError(f"{', '.join(given)}: only for a modelled kernel, not with --image")
        from ptilab.report.html import audit_report
        symbols = None
        if system_map:
            from ptilab.formats.kallsyms import read_symbols
            symbols = read_symbols(system_map)
        mem, value, geometry = _open_image_and_cr3(image, cr3, None, None)
        page = audit_report(mem, value, geometry, f"{image} (CR3 {value:#x}, {geometry.levels}-level)", symbols)
    else:
        if cr3 or system_map:
            raise PtilabError("--cr3 and --system-map go with --image")
        from ptilab.report.html import comparison_report
        page = comparison_report(profile, cpus, _levels(levels))
    try:
        Path(out).write_text(page, encoding="utf-8")
    except OSError as err:
        raise InputError(f"{out}: cannot write: {err.strerror}") from None
    click.echo(f"wrote {out} ({len(page.encode()) // 1024} KiB)")


@cli.command("meltdown")
@click.argument("image", required=False, type=click.Path(dir_okay=False))
@_with_image_options
@click.option("--system-map", type=click.Path(dir_okay=False), default=None,
              help="System.map or /proc/kallsyms text (unslid) to turn IDT handlers into a KASLR slide.")
@click.option("--design", default="linux", show_default=True, metavar="DESIGN",
              help="Without IMAGE: the modelled design to attack.")
@kernel_option
@cpus_option
@paging_option
@json_option
def meltdown(image, cr3, cpu, la57, system_map, design, profile, cpus, levels, as_json) -> None:
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
    from ptilab.paging import walk

    if image:
        from ptilab.audit.sources import views_from_image
        symbols = None
        if system_map:
            from ptilab.formats.kallsyms import read_symbols
            symbols = read_symbols(system_map)
        mem, value, geometry = _open_image_and_cr3(image, cr3, cpu, la57)
        found = views_from_image(mem, value, geometry)
        result = exposure(mem, found.user, symbols)
    else:
        from ptilab.linux.kernel import boot
        result = kernel_exposure(boot(profile, design, cpus, _levels(levels)))
    if as_json:
        _emit_json(result.as_dict())
        return
    from rich.table import Table
    t = Table(title="Readable through the user tables (Meltdown ignores the US bit)")
    for col in ("start", "end", "region", "pages", "frames", "rights"):
        t.add_column(col)
    for r in result.readable:
        t.add_row(f"{r.start:#x}", f"{r.end:#x}", r.region, str(r.pages), str(r.frames),
                  ("RW" if r.writable else "ro") + (" x" if r.executable else " NX"))
    console = _console()
    console.print(t)
    for leak in result.leaks:
        console.print(f"{leak.source} at {leak.va:#x}: {leak.value:#x} = {leak.meaning}")
    if result.text_base is not None:
        console.print(f"kernel text base {result.text_base:#x}"
                      + (f", KASLR slide {result.kaslr_slide:#x}" if result.kaslr_slide is not None else ""))
    for note in result.notes:
        console.print(note)


def main() -> None:
    """Console entry point: one line on stderr and a documented exit code on error.

    Exit codes: 0 success; 1 the audit found something at or above the chosen
    severity; 2 bad usage or bad input.
    """
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.exceptions.Abort:
        click.echo("ptilab: aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        click.echo(f"ptilab: error: {err.format_message()}", err=True)
        sys.exit(2)
    except PtilabError as err:
        click.echo(f"ptilab: error: {err}", err=True)
        sys.exit(err.exit_code)
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
