"""The command line: useful by default, one-line errors with documented exit codes."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from ptilab.cli import main
from ptilab.memory.elfwrite import qemu_cpu_note, write_elf_core
from ptilab.paging import entry as e
from tests.realkernel.conftest import real_kernel


def ptilab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ptilab.cli", *args], capture_output=True, text=True, timeout=300)


def test_no_arguments_compares_every_design_on_the_default_kernel():
    done = ptilab()
    assert done.returncode == 0
    for design in ("explicit", "mirror", "shared-pmd", "linux"):
        assert design in done.stdout
    assert "linux-6.1, 4 CPUs" in done.stdout


def test_compare_json_lists_every_design():
    reports = json.loads(ptilab("compare", "--kernel", "kaiser-2017", "--cpus", "2", "--json").stdout)
    assert [r["design"] for r in reports] == ["explicit", "mirror", "shared-pmd", "linux"]
    assert reports[0]["ap_work"] and not reports[3]["ap_work"]


def test_audit_exit_code_gates_on_severity():
    ok = real_kernel("pti-4level")
    off = real_kernel("pti-off")
    assert ptilab("audit", str(ok.path / "core.elf")).returncode == 0
    assert ptilab("audit", str(ok.path / "core.elf"), "--fail-on", "low").returncode == 1  # PTI-CEA-FIXED
    done = ptilab("audit", str(off.path / "core.elf"), "--json")
    assert done.returncode == 1
    assert json.loads(done.stdout)["findings"][0]["id"] == "PTI-OFF"


def test_an_audit_read_by_head_still_exits_with_its_verdict():
    off = real_kernel("pti-off")
    piped = subprocess.run(f"{sys.executable} -m ptilab.cli audit {off.path / 'core.elf'} | head -c 10; "
                           "exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", capture_output=True,
                           text=True, timeout=300)
    assert piped.returncode == 1 and piped.stderr == ""


def test_audit_json_gives_the_user_view_as_the_walk_summarises_it():
    k = real_kernel("pti-4level")
    view = json.loads(ptilab("audit", str(k.path / "core.elf"), "--json").stdout)["user_view"]
    def in_espfix(start: str) -> bool:  # ESPFIX_BASE_ADDR's P4D
        return 0xFFFF_FF00_0000_0000 <= int(start, 16) < 0xFFFF_FF80_0000_0000

    aliases = view["aliases"]
    assert aliases and all(in_espfix(a["start"]) and in_espfix(a["source"]) for a in aliases)
    espfix = [r for r in view["ranges"] if in_espfix(r["start"])]
    assert espfix and len(espfix) < 1000  # not the 65536 copies


def test_audit_of_a_file_that_is_not_an_image_is_a_one_line_error(tmp_path):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not memory")
    done = ptilab("audit", str(bogus), "--cr3", "1000")
    assert done.returncode == 2 and done.stderr.startswith("ptilab: error: ")


def test_dump_in_qemu_format_equals_qemus_info_mem():
    k = real_kernel("pti-4level")
    done = ptilab("dump", str(k.path / "core.elf"), "--cpu", "1", "--format", "qemu")
    assert done.returncode == 0
    assert done.stdout == (k.path / "cpu1.info_mem.txt").read_text()


def test_dump_in_ptdump_format_has_the_linux_markers():
    k = real_kernel("pti-5level")
    done = ptilab("dump", str(k.path / "core.elf"))
    assert done.returncode == 0
    for marker in ("---[ User Space ]---", "---[ CPU entry Area ]---", "---[ ESPfix Area ]---"):
        assert marker in done.stdout
    assert "entries skipped" in done.stdout


# -- in process, through main(): the same code path as the console script ----

def run(capsys, *args: str) -> tuple[int, str, str]:
    """ptilab args through ptilab.cli.main: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as done:
        main(list(args))
    out, err = capsys.readouterr()
    return done.value.code, out, err


PGD = 0x1000
PTE_FLAGS = e.P | e.RW | e.US | e.A


def _tiny_tables() -> bytes:
    """Four frames: nothing at 0, a PGD at 0x1000 mapping user page 0 through
    a PUD, PMD and PTE table packed in the next frames (one table each); its
    last slot reaches the same page as kernel code, as entry text would be
    (a CPU could enter the kernel: tables a CPU could run on)."""
    mem = bytearray(6 * 4096)
    for level, frame in enumerate((1, 2, 3, 4)):
        struct.pack_into("<Q", mem, frame * 4096, ((frame + 1) * 4096) | PTE_FLAGS)
    struct.pack_into("<Q", mem, 4096 + 511 * 8, 2 * 4096 | e.P | e.RW | e.A)
    return bytes(mem)


@pytest.fixture
def inputs(tmp_path, monkeypatch) -> Path:
    """A directory of small good and bad inputs, also the working directory."""
    (tmp_path / "raw.img").write_bytes(_tiny_tables())
    write_elf_core(tmp_path / "core.elf", [(0, _tiny_tables())],
                   [qemu_cpu_note(cr3=PGD, cs=0x33), qemu_cpu_note(cr3=PGD, cs=0x10)])
    whole = (tmp_path / "core.elf").read_bytes()
    (tmp_path / "truncated.elf").write_bytes(whole[:-5000])
    (tmp_path / "garbage.elf").write_bytes(b"\x7fELF" + bytes(range(7, 207)))
    (tmp_path / "cut.elf").write_bytes(whole[:40])
    (tmp_path / "magic.elf").write_bytes(whole[:4])  # DEL E L F is printable enough to pass for text
    (tmp_path / "magic.lime").write_bytes(b"EMiL")
    (tmp_path / "headers-only.elf").write_bytes(whole[:64])
    write_elf_core(tmp_path / "overlap.elf", [(0, _tiny_tables()), (0x1000, b"\x01" * 4096)],
                   [qemu_cpu_note(cr3=PGD, cs=0x33)])
    write_elf_core(tmp_path / "alias.elf", [(0, _tiny_tables()), (0x1000, _tiny_tables()[0x1000:0x3000])],
                   [qemu_cpu_note(cr3=PGD, cs=0x33)])
    (tmp_path / "tiny.img").write_bytes(b"\x00\xff" * 50)
    (tmp_path / "notes.txt").write_text("hello world\nthis is not ptdump\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "sysmap.txt").write_text("garbage line, not a symbol\n")
    (tmp_path / "bad.toml").write_text("this is = = not toml")
    (tmp_path / "badstep.toml").write_text('[[step]]\ndo = "jump"\n')
    (tmp_path / "adir").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


# Every way the CLI refuses its input: (arguments, words the one line must hold).
# Each exits 2, prints one line on stderr and nothing on stdout, writes no file.
REFUSALS = [
    # usage: click's own checks
    (["frobnicate"], "No such command"),
    (["compare", "--bogus"], "No such option"),
    (["compare", "--cpus", "abc"], "not a valid integer"),
    (["simulate", "--view", "sideways"], "'sideways' is not one of"),
    (["dump", "core.elf", "--format", "yaml"], "'yaml' is not one of"),
    (["dump"], "give an IMAGE to dump, or --live"),
    (["report"], "Missing argument 'OUT'"),
    (["completion", "tcsh"], "'tcsh' is not one of"),
    (["--color=maybe"], "does not take a value"),
    # the modelled kernel
    (["compare", "--kernel", "linux-9.9"], "choose one of: kaiser-2017, linux-4.15, linux-6.1"),
    (["simulate", "--design", "kaiser"], "choose one of: explicit, mirror, shared-pmd, linux"),
    (["meltdown", "--design", "kaiser"], "unknown design 'kaiser'"),
    (["compare", "--cpus", "0"], "between 1 and 8192, not 0"),
    (["compare", "--cpus", "99999"], "between 1 and 8192"),
    (["compare", "--cpus", "9000"], "between 1 and 8192"),
    (["compare", "--kernel", "kaiser-2017", "--cpus", "200"], "room for 102 CPUs"),
    (["compare", "--kernel", "kaiser-2017", "--paging", "5"], "no 5-level layout"),
    (["compare", "--paging", "3"], "--paging must be 4 or 5"),
    (["compare", "--seed", "3"], "--seed: linux-6.1 puts every CPU's cpu_entry_area at a fixed slot"),
    (["simulate", "--kernel", "linux-4.15", "--nokaslr"], "--kaslr: linux-4.15 puts every CPU's"),
    (["compare", "--kernel", "linux-6.12", "--seed", "x"], "not a valid integer"),
    (["compare", "--kernel", "linux-6.12", "--seed", "-1"], "-1 is not in the range x>=0"),
    (["layout-change", "--seed", "1"], "--seed: linux-6.1 puts every CPU's"),
    (["layout-change", "--cpus", "0"], "between 1 and 8192"),
    (["layout-change", "--kernel", "kaiser-2017", "--paging", "5"], "no 5-level layout"),
    (["simulate", "--paging", "five"], "--paging must be 4 or 5"),
    # cost
    (["cost", "--cpus", "1,,2"], "--cpus must be numbers separated by commas"),
    (["cost", "--cpus", "2,99999"], "between 1 and 8192"),
    (["cost", "--design", "mirror,kaiser"], "unknown design 'kaiser'"),
    (["cost", "--workload", "nope"], "unknown workload 'nope'"),
    (["cost", "--workload", "bad.toml"], "bad.toml"),
    (["cost", "--workload", "badstep.toml"], "step 1: 'do' must be one of"),
    (["cost", "--workload", "missing.toml"], "missing.toml: cannot read: No such file"),
    (["cost", "--cpus", "2", "--design", "linux", "--workload", "syscall", "--cpu", "7"], "CPU 7 does not exist"),
    (["cost", "--plot", "refill.pdf"], "must end in .png or .svg"),
    (["cost", "--cpus", "1", "--design", "linux", "--workload", "syscall", "--plot", "nodir/refill.svg"],
     "nodir/refill.svg: cannot write"),
    (["cost", "--plot", "adir"], "is a directory"),
    # images
    (["audit"], "give an IMAGE"),
    (["audit", "/no/such/core"], "cannot read"),
    (["audit", "adir"], "is a directory"),
    (["audit", "raw.img"], "carries no CPU registers and no VMCOREINFO (no note, none found in its memory): give --cr3"),
    (["audit", "tiny.img", "--cr3", "1000"], "less than one 4 KiB frame"),
    (["audit", "garbage.elf"], "garbage.elf: not a readable ELF core"),
    (["audit", "cut.elf"], "cut.elf: 40 bytes, cut inside its ELF header (64 bytes): truncated"),
    (["audit", "magic.elf"], "magic.elf: 4 bytes, cut inside its ELF header (64 bytes): truncated"),
    (["dump", "magic.lime", "--cr3", "1000"], "not a 32-byte LiME header: truncated"),
    (["audit", "headers-only.elf"], "its program-header table (2 entries at file offset 0x40) runs past the end of the file (0x40 bytes)"),
    (["audit", "overlap.elf"], "overlap with different contents (from 0x1000): which one is memory is ambiguous"),
    (["audit", "notes.txt"], "notes.txt: text (it starts 'hello world'), not a memory image"),
    (["dump", "sysmap.txt"], "not a memory image"),
    (["audit", "raw.img", "--cr3", "1_000"], "--cr3 must be a 64-bit hexadecimal number"),
    (["audit", "raw.img", "--cr3", "\u0661\u0660\u0660\u0660"], "--cr3 must be a 64-bit hexadecimal number"),
    (["compare", "--quiet"], "--quiet is ptilab's own option: put it before the command (ptilab --quiet COMMAND)"),
    (["cost", "--no-color"], "put it before the command"),
    (["cost", "--cpus", "1,4,1"], "--cpus names 1 twice"),
    (["cost", "--design", "linux,off,linux"], "--design names linux twice"),
    (["report", "out.html", "--design", "mirror,mirror"], "--design names mirror twice"),
    (["audit", "truncated.elf"], "truncated"),
    (["audit", "raw.img", "--cr3", "zz"], "--cr3 must be a 64-bit hexadecimal number"),
    (["audit", "raw.img", "--cr3", "-1000"], "--cr3 must be a 64-bit hexadecimal number"),
    (["audit", "raw.img", "--cr3", "1" + "0" * 16], "--cr3 must be a 64-bit hexadecimal number"),
    (["audit", "raw.img", "--cr3", "10000000"], "physical address 0x10000000 is outside the memory image"),
    (["audit", "core.elf", "--cpu", "2"], "--cpu 2: the core holds CPUs 0 to 1"),
    (["audit", "core.elf", "--cpu", "-1"], "--cpu -1"),
    (["audit", "core.elf", "--cpu", "1", "--cr3", "1000"], "give --cpu or --cr3, not both"),
    (["audit", "core.elf", "--fail-on", "urgent"], "unknown severity"),
    (["audit", "--fail-on", "urgent", "x"], "unknown severity"),
    (["audit", "core.elf", "--system-map", "sysmap.txt"], "sysmap.txt:1: not a System.map/kallsyms line"),
    (["audit", "core.elf", "--system-map", "notes.txt"], "not a System.map/kallsyms line"),
    (["audit", "core.elf", "--system-map", "missing.map"], "missing.map: cannot read: No such file"),
    (["audit", "--ptdump", "notes.txt"], "notes.txt:1: not a ptdump line"),
    (["audit", "--ptdump", "empty.txt"], "no ptdump lines"),
    (["audit", "--ptdump", "raw.img"], "raw.img: binary data, not ptdump text (a NUL byte at offset 0)"),
    (["audit", "--ptdump", "core.elf"], "binary data, not ptdump text (an ELF file: give it as IMAGE)"),
    (["audit", "core.elf", "--system-map", "raw.img"], "binary data, not System.map/kallsyms text"),
    (["audit", "--ptdump", "missing.txt"], "cannot read"),
    (["audit", "core.elf", "--ptdump", "notes.txt"], "give an IMAGE or --ptdump, not both"),
    (["audit", "--ptdump", "notes.txt", "--cr3", "1000"], "--cr3: only with an IMAGE"),
    (["dump", "raw.img"], "give --cr3"),
    (["dump", "raw.img", "--cr3", "10000000"], "outside the memory image"),
    (["dump", "garbage.elf"], "not a readable ELF core"),
    (["dump", "core.elf", "--format", "qemu", "--json"], "--json and --format qemu"),
    (["meltdown", "raw.img"], "give --cr3"),
    (["meltdown", "raw.img", "--cr3", "10000000"], "outside the memory image"),
    (["meltdown", "raw.img", "--cr3", "1000", "--design", "mirror"], "--design: only for a modelled kernel"),
    (["meltdown", "--cr3", "1000"], "--cr3: only with an IMAGE"),
    (["meltdown", "core.elf", "--system-map", "sysmap.txt"], "not a System.map/kallsyms line"),
    # report: nothing written unless all of it is
    (["report", "adir"], "is a directory"),
    (["report", "nodir/out.html", "--kernel", "kaiser-2017", "--cpus", "2"], "nodir/out.html: cannot write"),
    (["report", "raw.img/out.html", "--kernel", "kaiser-2017", "--cpus", "2"], "cannot write"),
    (["report", "out.html", "--cpus", "0"], "between 1 and 8192"),
    (["report", "out.html", "--cr3", "1000"], "--cr3: only with --image"),
    (["report", "out.html", "--image", "missing.core"], "cannot read"),
    (["report", "out.html", "--image", "raw.img"], "give --cr3"),
    (["report", "out.html", "--image", "garbage.elf"], "not a readable ELF core"),
    (["report", "out.html", "--image", "core.elf", "--cpus", "2"], "--cpus: only for a modelled kernel"),
    (["report", "out.html", "--design", "linux,bogus"], "unknown design 'bogus'"),
    (["report", "out.html", "--image", "core.elf", "--design", "linux"], "--design: only for a modelled kernel"),
    (["report", "out.html", "--image", "core.elf", "--system-map", "sysmap.txt"], "not a System.map"),
]


@pytest.mark.parametrize("args, words", REFUSALS, ids=[" ".join(a) for a, _ in REFUSALS])
def test_bad_input_is_one_line_exit_2_and_nothing_else(capsys, inputs, args, words):
    before = sorted(p.name for p in inputs.rglob("*"))
    code, out, err = run(capsys, *args)
    assert code == 2
    assert err.startswith("ptilab: error: ") and err.count("\n") == 1 and words in err, err
    assert "Traceback" not in err
    assert out == ""
    assert sorted(p.name for p in inputs.rglob("*")) == before  # no output file, whole or partial


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
@pytest.mark.parametrize("args", [["audit", "secret.img", "--cr3", "1000"], ["audit", "--ptdump", "secret.img"],
                                  ["audit", "core.elf", "--system-map", "secret.img"]])
def test_an_unreadable_file_is_one_line_exit_2(capsys, inputs, args):
    (inputs / "secret.img").write_bytes(bytes(8192))
    (inputs / "secret.img").chmod(0)
    code, out, err = run(capsys, *args)
    assert code == 2 and out == "" and err.count("\n") == 1 and "Permission denied" in err


def test_the_console_script_refuses_bad_input_the_same_way():
    done = ptilab("compare", "--kernel", "linux-9.9")
    assert done.returncode == 2
    assert done.stderr == ("ptilab: error: unknown kernel profile 'linux-9.9'; "
                           "choose one of: kaiser-2017, linux-4.15, linux-6.1, linux-6.12\n")
    assert done.stdout == ""


def test_an_interrupt_exits_130_with_one_line(capsys, monkeypatch):
    import ptilab.compare.metrics

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(ptilab.compare.metrics, "compare", interrupted)
    code, out, err = run(capsys, "compare")
    assert code == 130 and out == ""
    assert err == "ptilab: interrupted\n"


def test_a_write_that_fails_half_way_leaves_the_old_report_whole(capsys, inputs, monkeypatch):
    import ptilab.cli
    import ptilab.report.html

    old = inputs / "out.html"
    old.write_text("the previous report")
    monkeypatch.setattr(ptilab.report.html, "comparison_report", lambda *args: "<html>" + "x" * 100_000)

    class FullDisk:
        def __init__(self, path, mode):
            self.f = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:4096])
            raise OSError(28, "No space left on device")
    monkeypatch.setattr(ptilab.cli, "open", FullDisk, raising=False)
    code, out, err = run(capsys, "report", "out.html")
    assert code == 2 and out == ""
    assert err == "ptilab: error: out.html: cannot write: No space left on device\n"
    assert old.read_text() == "the previous report"
    assert not [p.name for p in inputs.iterdir() if p.name.startswith(".")]  # the temporary is gone too


# -- success: exit 0, and with --json one JSON document on stdout -------------

JSON_RUNS = [
    ["compare", "--kernel", "kaiser-2017", "--cpus", "2", "--json"],
    ["layout-change", "--kernel", "kaiser-2017", "--cpus", "2", "--json"],
    ["simulate", "--kernel", "kaiser-2017", "--cpus", "2", "--view", "user", "--json"],
    ["cost", "--cpus", "2", "--design", "linux,off", "--workload", "syscall", "--json"],
    ["audit", "core.elf", "--json", "--fail-on", "critical"],
    ["audit", "raw.img", "--cr3", "1000", "--json", "--fail-on", "critical"],
    ["dump", "core.elf", "--json"],
    ["dump", "alias.elf", "--json"],
    ["dump", "raw.img", "--cr3", "1000", "--format", "json"],
    ["meltdown", "--kernel", "kaiser-2017", "--cpus", "2", "--json"],
    ["meltdown", "core.elf", "--json"],
    ["report", "out.html", "--kernel", "kaiser-2017", "--cpus", "2", "--json"],
    ["-q", "report", "out.html", "--image", "core.elf", "--json"],
]


@pytest.mark.parametrize("args", JSON_RUNS, ids=[" ".join(a) for a in JSON_RUNS])
def test_json_is_the_only_thing_on_stdout(capsys, inputs, args):
    code, out, err = run(capsys, *args)
    assert code == 0, err
    json.loads(out)
    assert err == ""


def test_report_json_says_what_it_wrote(capsys, inputs):
    code, out, _ = run(capsys, "report", "out.html", "--kernel", "kaiser-2017", "--cpus", "2", "--json")
    done = json.loads(out)
    assert done["wrote"] == "out.html" and done["bytes"] == (inputs / "out.html").stat().st_size
    assert done["report"] == "designs" and done["kernel"] == "kaiser-2017" and done["cpus"] == 2
    assert [p.name for p in inputs.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_report_of_one_design_is_a_simulation_of_it(capsys, inputs):
    code, out, _ = run(capsys, "report", "one.html", "--kernel", "kaiser-2017", "--cpus", "2",
                       "--design", "shared-pmd", "--json")
    assert code == 0 and json.loads(out)["designs"] == ["shared-pmd"]
    page = (inputs / "one.html").read_text()
    assert 'id="design-shared-pmd"' in page
    assert not [d for d in ("explicit", "mirror", "linux") if f'id="design-{d}"' in page]
    assert 'class="cost-row" data-design="off"' in page  # its cost, against PTI off


def test_report_says_what_it_wrote_unless_quiet(capsys, inputs):
    code, out, _ = run(capsys, "report", "out.html", "--kernel", "kaiser-2017", "--cpus", "2")
    assert code == 0 and out.startswith("wrote out.html (")
    code, out, _ = run(capsys, "--quiet", "report", "out.html", "--kernel", "kaiser-2017", "--cpus", "2")
    assert code == 0 and out == ""


def test_cost_writes_its_plot_and_says_so_unless_quiet(capsys, inputs):
    args = ["cost", "--cpus", "1,2", "--design", "linux", "--workload", "syscall", "--plot", "refill.svg"]
    code, out, _ = run(capsys, *args)
    assert code == 0 and out.rstrip().endswith("plot written to refill.svg")
    assert (inputs / "refill.svg").read_text().lstrip().startswith("<?xml")
    code, out, _ = run(capsys, "-q", *args)
    assert code == 0 and "plot written" not in out and "TLB refill cost" in out


def test_piped_tables_are_plain_aligned_text(capsys):
    code, out, _ = run(capsys, "compare", "--kernel", "kaiser-2017", "--cpus", "2")
    assert code == 0
    assert "\x1b" not in out
    assert not set(out) & set("─━│┃┏┓┗┛┡┩╇╭╮╰╯═")
    lines = out.splitlines()
    assert lines[0] == "PTI designs on kaiser-2017, 2 CPUs, 4-level paging"
    header = lines[1]
    assert header.startswith("design ") and header.index("user tables") == lines[2].index("4 (16 KiB)")
    assert all(line == line.rstrip() for line in lines)


def test_color_forces_the_terminal_look_and_no_color_drops_the_codes(capsys, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    code, out, _ = run(capsys, "--color", "meltdown", "--kernel", "kaiser-2017", "--cpus", "2")
    assert code == 0 and "\x1b[" in out and "┃" in out
    monkeypatch.setenv("FORCE_COLOR", "1")
    code, out, _ = run(capsys, "--no-color", "meltdown", "--kernel", "kaiser-2017", "--cpus", "2")
    assert code == 0 and "┃" in out and "\x1b[" not in out  # no colour, bold or italic: no escape code at all
    monkeypatch.setenv("NO_COLOR", "1")
    code, out, _ = run(capsys, "--color", "meltdown", "--kernel", "kaiser-2017", "--cpus", "2")
    assert code == 0 and "\x1b[" in out  # the flag outranks the environment
    code, out, _ = run(capsys, "meltdown", "--kernel", "kaiser-2017", "--cpus", "2")
    assert code == 0 and "\x1b[" not in out


# -- help, completion ------------------------------------------------------------

COMMANDS = ["compare", "layout-change", "simulate", "cost", "audit", "dump", "report", "meltdown", "completion"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_shows_examples(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    examples = out[out.index("Example"):].splitlines()[1:]
    assert any(line.strip().startswith(("ptilab ", "eval ")) for line in examples)


def test_the_help_documents_every_exit_code(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    codes = out[out.index("Exit codes:"):]
    for number, meaning in (("0", "success"), ("1", "--fail-on"), ("2", "bad usage or bad input"),
                            ("130", "interrupted")):
        assert any(line.split()[:1] == [number] and meaning in line for line in codes.splitlines())
    for command in COMMANDS:
        assert command in out


def _complete(*words: str) -> list[str]:
    env = {**os.environ, "_PTILAB_COMPLETE": "bash_complete", "COMP_WORDS": " ".join(["ptilab", *words]),
           "COMP_CWORD": str(len(words))}
    done = subprocess.run([sys.executable, "-m", "ptilab.cli"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [line.split(",", 1)[1] for line in done.stdout.splitlines()]


def test_completion_offers_kernel_profiles():
    assert _complete("compare", "--kernel", "li") == ["linux-4.15", "linux-6.1", "linux-6.12"]


def test_completion_offers_designs_and_workloads():
    assert _complete("simulate", "--design", "s") == ["shared-pmd"]
    assert _complete("cost", "--design", "mirror,") == ["mirror,all", "mirror,explicit", "mirror,mirror",
                                                        "mirror,shared-pmd", "mirror,linux", "mirror,off"]
    assert _complete("cost", "--workload", "s") == ["syscall"]
    assert _complete("la") == ["layout-change"]


@pytest.mark.parametrize("shell, says", [("bash", "complete -o nosort -F"), ("zsh", "compdef"),
                                          ("fish", "complete --no-files --command ptilab")])
def test_completion_prints_the_shell_script(capsys, shell, says):
    code, out, _ = run(capsys, "completion", shell)
    assert code == 0 and says in out and "_PTILAB_COMPLETE" in out


# -- output paths: only a regular file or a new one, symlinks followed --------

def _special(kind: str, path: Path) -> None:
    import stat
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "char device":
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a /dev/null of our own
    elif kind == "directory":
        path.mkdir()
    elif kind == "symlink to a fifo":
        os.mkfifo(path.with_name("fifo"))
        path.symlink_to("fifo")


SPECIAL = ["fifo", "char device", "directory", "symlink to a fifo"]
WRITERS = [["report", "{}", "--kernel", "kaiser-2017", "--cpus", "2"],
           ["cost", "--cpus", "1", "--design", "linux", "--workload", "syscall", "--plot", "{}"]]


@pytest.mark.parametrize("kind", SPECIAL)
@pytest.mark.parametrize("command", WRITERS, ids=["report", "cost --plot"])
def test_a_special_file_as_output_is_refused_and_left_alone(capsys, tmp_path, monkeypatch, kind, command):
    if kind == "char device" and os.geteuid() != 0:
        pytest.skip("mknod needs root")
    monkeypatch.chdir(tmp_path)
    name = "out.svg"
    _special(kind, tmp_path / name)
    before = os.lstat(tmp_path / name)
    code, out, err = run(capsys, *[a.format(name) for a in command])
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert f"{name}" in err and " is a " in err
    after = os.lstat(tmp_path / name)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


@pytest.mark.parametrize("name, words", [("", "the output file name is empty"), ("-", "give a file name")])
@pytest.mark.parametrize("command", WRITERS, ids=["report", "cost --plot"])
def test_an_empty_or_dash_output_name_is_refused(capsys, tmp_path, monkeypatch, name, words, command):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *[a.format(name) for a in command])
    assert code == 2 and out == "" and words in err and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []


def test_a_symlinked_output_replaces_its_target_and_stays_a_link(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real.html").write_text("old")
    (tmp_path / "link.html").symlink_to("real.html")
    (tmp_path / "dangling.html").symlink_to("new.html")
    for name in ("link.html", "dangling.html"):
        code, _, err = run(capsys, "-q", "report", name, "--kernel", "kaiser-2017", "--cpus", "2")
        assert code == 0, err
        assert (tmp_path / name).is_symlink()
    assert (tmp_path / "real.html").read_text().startswith("<!DOCTYPE html>")
    assert (tmp_path / "new.html").read_text().startswith("<!DOCTYPE html>")
    assert sorted(os.listdir(tmp_path)) == ["dangling.html", "link.html", "new.html", "real.html"]


def test_sigterm_during_a_report_leaves_no_temporary(tmp_path):
    """A real process and a real signal: the temporary goes, as after Ctrl-C."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "ptilab.cli", "-q", "report", "out.html", "--cpus", "1024"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    give_up = time.monotonic() + 60
    while not [p for p in os.listdir(tmp_path) if p.startswith(".out.html.")] and time.monotonic() < give_up:
        time.sleep(0.02)
    assert proc.poll() is None, "the report ended before its temporary was seen"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err == "ptilab: terminated\n" and out == ""
    assert os.listdir(tmp_path) == []


# -- tables that map nothing a CPU could run on: never clean ------------------

# b000: a zeroed frame of the real core; e0000: inside the BIOS ROM.
NOT_TABLES = ["b000", "e0000"]


@pytest.mark.parametrize("cr3", NOT_TABLES)
def test_auditing_tables_no_cpu_could_run_on_is_a_finding(cr3):
    k = real_kernel("pti-4level")
    done = ptilab("audit", str(k.path / "core.elf"), "--cr3", cr3, "--json", "--fail-on", "high")
    assert done.returncode == 1, done.stderr
    ids = [f["id"] for f in json.loads(done.stdout)["findings"]]
    assert ids[0] == "TABLES-NO-ENTRY"


@pytest.mark.parametrize("cr3", NOT_TABLES)
def test_dumping_tables_no_cpu_could_run_on_says_so_and_exits_1(cr3):
    k = real_kernel("pti-4level")
    done = ptilab("dump", str(k.path / "core.elf"), "--cr3", cr3)
    assert done.returncode == 1
    assert done.stdout  # printed all the same
    assert done.stderr.startswith(f"ptilab: warning: CR3 {int(cr3, 16):#x}: these tables map no executable kernel page")


def test_dumping_a_live_cpus_tables_warns_of_nothing():
    k = real_kernel("pti-4level")
    for cpu in ("0", "1"):
        done = ptilab("dump", str(k.path / "core.elf"), "--cpu", cpu, "--format", "qemu")
        assert done.returncode == 0 and done.stderr == ""


# -- meltdown on images with frames past their end ---------------------------

def _tables_with_idt_past_the_image() -> bytes:
    """PGD 0x1000: slot 508 reaches the IDT page (0xfffffe0000000000) through
    tables at 0x2000-0x4000, mapped to frame 0x100000, far past this 6-frame
    image; slot 511 maps the last 1 GiB of the address space (ending at 2**64)
    as kernel text through a PUD at 0x5000."""
    mem = bytearray(6 * 4096)
    table = e.P | e.RW | e.A
    struct.pack_into("<Q", mem, 0x1000 + 508 * 8, 0x2000 | table)
    struct.pack_into("<Q", mem, 0x2000, 0x3000 | table)
    struct.pack_into("<Q", mem, 0x3000, 0x4000 | table)
    struct.pack_into("<Q", mem, 0x4000, 0x1000_0000 | e.P | e.NX)
    struct.pack_into("<Q", mem, 0x1000 + 511 * 8, 0x5000 | table)
    struct.pack_into("<Q", mem, 0x5000 + 511 * 8, 0x4000_0000 | e.P | e.PS | e.A)
    return bytes(mem)


def test_meltdown_marks_a_page_past_the_image_unreadable_and_goes_on(tmp_path):
    (tmp_path / "cut.img").write_bytes(_tables_with_idt_past_the_image())
    done = subprocess.run([sys.executable, "-W", "error", "-m", "ptilab.cli", "meltdown", "cut.img", "--cr3", "1000",
                           "--json"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr  # no numpy overflow warning either
    result = json.loads(done.stdout)
    assert "0xfffffe0000000000 maps physical address 0x10000000, which the image does not hold: that page is " \
           "unreadable here" in result["notes"]
    assert result["readable"][-1]["end"] == hex(1 << 64)


def test_meltdown_on_a_real_image_does_not_talk_about_the_modelled_designs():
    k = real_kernel("pti-4level")
    done = ptilab("meltdown", str(k.path / "core.elf"), "--cr3", "b000")
    assert done.returncode == 0
    assert "the IDT page (0xfffffe0000000000) is not in the user tables: no handler address from it\n" in done.stdout
    assert "design" not in done.stdout and "2017" not in done.stdout
