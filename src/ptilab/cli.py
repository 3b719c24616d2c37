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
    from ptilab.formats.ptdump import format_walk, linux_markers
    from ptilab.linux.kernel import boot
    from ptilab.paging import walk

    kernel = boot(profile, design, cpus, _levels(levels))
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
