"""Long fuzzing: the CI fuzz targets (tests/fuzz/targets.py) for as many minutes as asked.

Runs hypothesis in rounds of fresh random inputs, target by target in turn,
and records every input that raised anything but a ptilab error (or broke an
invariant) instead of stopping at the first. Prints, per target, the inputs
tried and the distinct crashes (exception type and where it was raised), and
saves a reproducer per distinct crash.

    python bench/fuzz_long.py --minutes 30 [--target NAME ...] [--crashes DIR] [--corpus DIR]

An input that takes more than --hang CPU seconds counts as a hang (saved like
a crash). --corpus keeps the first few inputs of each target (Python literals,
read back by tests/fuzz/test_fuzz.py).
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from hypothesis import HealthCheck, given, settings  # noqa: E402

from ptilab.errors import PtilabError  # noqa: E402
from tests.fuzz import targets  # noqa: E402

ROUND = 500  # inputs per hypothesis run; a fresh random seed each round


def signature(ex: BaseException) -> str:
    frames = traceback.extract_tb(ex.__traceback__)
    inner = next((f for f in reversed(frames) if "/ptilab/" in f.filename), frames[-1] if frames else None)
    where = f"{Path(inner.filename).name}:{inner.lineno} {inner.name}" if inner else "?"
    return f"{type(ex).__name__} at {where}: {str(ex)[:100]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--target", action="append", choices=sorted(targets.TARGETS))
    parser.add_argument("--crashes", type=Path, default=Path("fuzz-crashes"))
    parser.add_argument("--hang", type=float, default=10.0, help="CPU seconds after which an input is a hang")
    parser.add_argument("--corpus", type=Path, default=None, help="keep --keep inputs per target here")
    parser.add_argument("--keep", type=int, default=4)
    args = parser.parse_args()
    names = args.target or sorted(targets.TARGETS)
    if not targets.real_fixture_present():
        dropped = [n for n in names if n in targets.NEED_FIXTURE]
        names = [n for n in names if n not in targets.NEED_FIXTURE]
        print(f"real-kernel fixture missing: not fuzzing {dropped}")
    slowest: dict[str, float] = {n: 0.0 for n in names}
    kept: Counter[str] = Counter()
    tried: Counter[str] = Counter()
    crashes: dict[str, dict[str, int]] = {n: {} for n in names}
    deadline = time.monotonic() + args.minutes * 60
    started = time.monotonic()
    rounds = 0
    while time.monotonic() < deadline:
        name = names[rounds % len(names)]
        rounds += 1
        strategy, target = targets.TARGETS[name]

        @settings(max_examples=ROUND, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def run(value):
            if time.monotonic() >= deadline:
                return
            tried[name] += 1
            if args.corpus and kept[name] < args.keep and tried[name] % 97 == 1:
                args.corpus.mkdir(parents=True, exist_ok=True)
                text = repr(value)
                if len(text) < 60_000:
                    ast.literal_eval(text)  # what the corpus test reads back
                    (args.corpus / f"{name}-{kept[name]}.txt").write_text(text)
                    kept[name] += 1
            began = time.process_time()  # CPU time: a niced run on a busy machine waits, it does not hang
            try:
                target(value)
                ex = None
            except PtilabError:
                ex = None
            except Exception as caught:  # a crash: record it, keep going
                ex = caught
            took = time.process_time() - began
            slowest[name] = max(slowest[name], took)
            if ex is None and took > args.hang:
                ex = TimeoutError(f"took {took:.1f} CPU s (a hang: over {args.hang} s)")
            if ex is not None:
                sig = signature(ex)
                seen = crashes[name]
                if sig not in seen:
                    args.crashes.mkdir(parents=True, exist_ok=True)
                    (args.crashes / f"{name}-{len(seen)}.txt").write_text(
                        f"{sig}\n\ninput:\n{value!r}\n\n{''.join(traceback.format_exception(ex))}")
                    print(f"[{time.monotonic() - started:7.0f} s] new crash in {name}: {sig}", flush=True)
                seen[sig] = seen.get(sig, 0) + 1

        run()
        if rounds % len(names) == 0:
            print(f"[{time.monotonic() - started:7.0f} s] tried " +
                  ", ".join(f"{n} {tried[n]}" for n in names) +
                  f"; distinct crashes {sum(len(c) for c in crashes.values())}", flush=True)
    print(f"\nfuzzed {time.monotonic() - started:.0f} s")
    print(f"{'target':<11}{'inputs':>10}{'crashes':>9}{'distinct':>10}{'slowest CPU s':>15}")
    for n in names:
        print(f"{n:<11}{tried[n]:>10}{sum(crashes[n].values()):>9}{len(crashes[n]):>10}{slowest[n]:>15.2f}")
        for sig, count in crashes[n].items():
            print(f"    {count:6d} x {sig}")
    return 1 if any(crashes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
