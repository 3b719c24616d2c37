"""Long fuzzing: the CI fuzz targets (tests/fuzz/targets.py) for as many minutes as asked.

Runs hypothesis in rounds of fresh random inputs, target by target in turn,
and records every input that raised anything but a ptilab error (or broke an
invariant) instead of stopping at the first. Prints, per target, the inputs
tried and the distinct crashes (exception type and where it was raised), and
saves a reproducer per distinct crash.

    python bench/fuzz_long.py --minutes 30 [--target core|walk|text ...] [--crashes DIR]
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    names = args.target or sorted(targets.TARGETS)
    if not targets.real_fixture_present():
        dropped = [n for n in names if n != "core"]
        names = ["core"]
        print(f"real-kernel fixture missing: fuzzing only the core reader, not {dropped}")
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
            try:
                target(value)
            except PtilabError:
                pass
            except Exception as ex:  # a crash: record it, keep going
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
    print(f"{'target':<8}{'inputs':>10}{'crashes':>9}{'distinct':>10}")
    for n in names:
        print(f"{n:<8}{tried[n]:>10}{sum(crashes[n].values()):>9}{len(crashes[n]):>10}")
        for sig, count in crashes[n].items():
            print(f"    {count:6d} x {sig}")
    return 1 if any(crashes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
