"""Where a collector's time goes: py-spy samples a `kdwatch collect` process consuming N predictions.

Writes the flame graph (benchmarks/profiles/collector.svg) and prints the functions with the most
samples, by own time and by inclusive time.

    python benchmarks/profile_collector.py [--n 200000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from common import ROOT, print_profile, py_spy
from ingest import collector_env, filled_broker

OUT = ROOT / "benchmarks" / "profiles"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    spy = py_spy()
    OUT.mkdir(exist_ok=True)
    with filled_broker(args.n) as (info, topics, home):
        env = collector_env(info.bootstrap, topics, home / "k.db")
        collect = [sys.executable, "-m", "kdwatch.cli", "collect", "--idle-exit", "3"]
        raw = home / "stacks.txt"
        subprocess.run([spy, "record", "--rate", "200", "--format", "raw", "-o", str(raw), "--", *collect],
                       env=env, check=True, capture_output=True)
        subprocess.run([spy, "record", "--rate", "100", "-o", str(OUT / "collector.svg"), "--", *collect],
                       env=collector_env(info.bootstrap, topics, home / "k2.db"), check=True, capture_output=True)
        print_profile(raw, f"`kdwatch collect` consuming {args.n:,} predictions (flame graph: {OUT / 'collector.svg'})",
                      args.top, root="Collector.run")


if __name__ == "__main__":
    main()
