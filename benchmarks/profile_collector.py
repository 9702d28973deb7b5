"""Where a collector's time goes: py-spy samples a `kdwatch collect` process consuming N predictions.

Writes the flame graph (benchmarks/profiles/collector.svg) and prints the functions with the most
samples, by own time and by inclusive time.

    python benchmarks/profile_collector.py [--n 200000]
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys

from common import ROOT
from ingest import collector_env, filled_broker

OUT = ROOT / "benchmarks" / "profiles"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    py_spy = shutil.which("py-spy", path=str(ROOT / ".venv" / "bin")) or shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("py-spy is needed: .venv/bin/pip install py-spy (make bench does)")
    OUT.mkdir(exist_ok=True)
    with filled_broker(args.n) as (info, topics, home):
        env = collector_env(info.bootstrap, topics, home / "k.db")
        collect = [sys.executable, "-m", "kdwatch.cli", "collect", "--idle-exit", "3"]
        raw = home / "stacks.txt"
        subprocess.run([py_spy, "record", "--rate", "200", "--format", "raw", "-o", str(raw), "--", *collect],
                       env=env, check=True, capture_output=True)
        subprocess.run([py_spy, "record", "--rate", "100", "-o", str(OUT / "collector.svg"), "--", *collect],
                       env=collector_env(info.bootstrap, topics, home / "k2.db"), check=True, capture_output=True)
        own: collections.Counter[str] = collections.Counter()
        inclusive: collections.Counter[str] = collections.Counter()
        total = 0
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].split("/")[-1] + ")" if " (" in f else f
                      for f in stack.split(";")]
            n = int(count)
            total += n
            if frames:
                own[frames[-1]] += n
            for frame in set(frames):
                inclusive[frame] += n
    print(f"\n{total} samples of `kdwatch collect` consuming {args.n:,} predictions (flame graph: {OUT / 'collector.svg'})\n")
    for title, counter in (("own time", own), ("inclusive time", inclusive)):
        print(f"| function ({title}) | share |")
        print("|---|---|")
        for frame, n in counter.most_common(args.top):
            print(f"| {frame} | {n / total:.1%} |")
        print()


if __name__ == "__main__":
    main()
