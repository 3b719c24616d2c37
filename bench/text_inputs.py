"""Benchmark: every text reader's peak memory on hostile inputs of any size.

Each reader (ptdump, System.map/kallsyms, QEMU `info mem` and `info tlb`,
workload TOML) runs in a fresh child process, through the CLI where the CLI
reads it, over:

    random    --mb MB of random bytes
    sparse    a 64 GiB sparse file (zeros)
    text+rand a few valid lines, then --mb MB of random bytes
    repeated  --mb MB of one valid line repeated (the reader must stop or stream)

and the child's peak RSS (getrusage of the child, from os.wait4) is printed
with the ratio against the same reader on its small real input (the
baseline, measured in the same run). Target (issue 11): at most 200 MB on
every input; each run must end with exit 0 or a one-line error (exit 2).

    python bench/text_inputs.py [--mb 300] [--dir /tmp/ptilab-text-bench]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "realkernel" / "out" / "pti-4level"
TARGET_RSS = 200 << 20
SPARSE = 64 << 30

PTDUMP_LINE = b"0xfffffe0000000000-0xfffffe0000001000           4K     ro                 GLB NX pte\n"
KALLSYMS_LINE = b"ffffffff81000000 T some_kernel_function\n"
INFO_MEM_LINE = b"0000000000400000-00000000004f0000 00000000000f0000 ur-\n"
INFO_TLB_LINE = b"0000000000400000: 000000000330d000 X---A--U-\n"
TOML_LINE = b'[[step]]\ndo = "read"\nat = "idt"\n'

# The QEMU readers have no command: call them as the CLI would report them.
READ = ("import sys\nfrom ptilab.errors import PtilabError\nfrom ptilab.formats.qemu import {0}\n"
        "try:\n    {0}(sys.argv[1])\nexcept PtilabError as err:\n    print(f'ptilab: error: {{err}}', file=sys.stderr)\n    sys.exit(2)")

# reader: (valid line to repeat, the argv reading FILE, the small real input for the baseline)
READERS = {
    "ptdump": (PTDUMP_LINE, ["-m", "ptilab.cli", "audit", "--ptdump", "FILE"], None),
    "kallsyms": (KALLSYMS_LINE, ["-m", "ptilab.cli", "meltdown", "RAW", "--cr3", "1000", "--system-map", "FILE"],
                 FIXTURE / "kallsyms.txt"),
    "info mem": (INFO_MEM_LINE, ["-c", READ.format("read_info_mem"), "FILE"], FIXTURE / "cpu0.info_mem.txt"),
    "info tlb": (INFO_TLB_LINE, ["-c", READ.format("read_info_tlb"), "FILE"], FIXTURE / "cpu0.info_tlb.txt"),
    "workload": (TOML_LINE, ["-m", "ptilab.cli", "cost", "--cpus", "1", "--design", "off", "--workload", "FILE"],
                 ROOT / "src" / "ptilab" / "mmu" / "workloads" / "context-switch.toml"),
}


def write_inputs(directory: Path, mb: int) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    made = {"random": directory / "random.bin", "sparse": directory / "sparse.bin"}
    if not made["random"].exists() or made["random"].stat().st_size != mb << 20:
        with open(made["random"], "wb") as f:
            for _ in range(mb):
                f.write(os.urandom(1 << 20))
    if not made["sparse"].exists():
        with open(made["sparse"], "wb") as f:
            f.truncate(SPARSE)
    (directory / "raw.img").write_bytes(bytes(6 * 4096))
    return made


def derived(directory: Path, reader: str, kind: str, mb: int, made: dict[str, Path]) -> Path:
    """The input file for one reader: named .toml for the workload reader."""
    line = READERS[reader][0]
    suffix = ".toml" if reader == "workload" else ".txt"
    path = directory / f"{reader.replace(' ', '_')}-{kind}{suffix}"
    if kind in ("random", "sparse"):
        if not path.is_symlink():
            path.symlink_to(made[kind].name)
    elif not path.exists():
        with open(path, "wb") as f:
            if kind == "text+rand":
                f.write(line * (2048 // len(line) + 1))  # past the first kilobyte
                with open(made["random"], "rb") as rnd:
                    while chunk := rnd.read(1 << 20):
                        f.write(chunk)
            else:
                block = line * ((1 << 20) // len(line))
                for _ in range(mb):
                    f.write(block)
    return path


def run(argv: list[str], path: Path, directory: Path) -> tuple[int, int, float, str]:
    """(exit code, peak RSS bytes, seconds, first stderr line) of one child."""
    args = [sys.executable] + [str(path) if a == "FILE" else str(directory / "raw.img") if a == "RAW" else a
                               for a in argv]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    started = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024, time.perf_counter() - started, err.strip().splitlines()[:1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=300)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ptilab-text-bench"))
    args = parser.parse_args()
    made = write_inputs(args.dir, args.mb)
    failed = False
    print(f"{'reader':<10}{'input':<11}{'exit':>5}{'peak MB':>9}{'x base':>8}{'s':>7}  stderr")
    for reader, (line, argv, small) in READERS.items():
        if small is None or not small.exists():
            small = args.dir / f"{reader.replace(' ', '_')}-small.txt"
            small.write_bytes(line * 100)
        code, base, secs, err = run(argv, small, args.dir)
        print(f"{reader:<10}{'baseline':<11}{code:>5}{base / 2**20:>9.0f}{1:>8.2f}{secs:>7.1f}  {''.join(err)[:70]}")
        for kind in ("random", "sparse", "text+rand", "repeated"):
            code, peak, secs, err = run(argv, derived(args.dir, reader, kind, args.mb, made), args.dir)
            bad = peak > TARGET_RSS or code not in (0, 2) or (code == 2 and len(err) != 1)
            failed |= bad
            print(f"{reader:<10}{kind:<11}{code:>5}{peak / 2**20:>9.0f}{peak / base:>8.2f}{secs:>7.1f}  "
                  f"{''.join(err)[:70]}{'  <-- OVER TARGET' if bad else ''}", flush=True)
    print(f"\ntarget: peak RSS at most {TARGET_RSS >> 20} MB on every input, exit 0 or one line and exit 2: "
          f"{'MISSED' if failed else 'met'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
