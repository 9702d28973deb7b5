"""Where `kdwatch analyze` spends its time on Parquet: py-spy samples the columnar path over N predictions.

The same data as analyze_vs_peers.py (10 % replays, 10 % labels, a reference of N predictions).
Writes the flame graph (benchmarks/profiles/analyze.svg) and prints the functions with the most
samples; with --native, time inside numpy and Arrow shows under their own frames.

    python benchmarks/profile_analyze.py [--n 1000000]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from common import ROOT, dataset, parquet_dataset, print_profile, py_spy

OUT = ROOT / "benchmarks" / "profiles"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    spy = py_spy()
    OUT.mkdir(exist_ok=True)
    current = parquet_dataset(dataset(args.n, seed=0))
    reference = parquet_dataset({"prediction": dataset(args.n, seed=1)["prediction"]})["prediction"]
    analyze = [str(ROOT / ".venv" / "bin" / "python"), "-m", "kdwatch.cli", "analyze",
               "--predictions", str(current["prediction"]), "--teacher", str(current["teacher"]),
               "--labels", str(current["label"]), "--reference", str(reference)]
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "stacks.txt"
        subprocess.run([spy, "record", "--rate", "250", "--native", "--format", "raw", "-o", str(raw), "--", *analyze],
                       check=True, capture_output=True)
        subprocess.run([spy, "record", "--rate", "100", "-o", str(OUT / "analyze.svg"), "--", *analyze],
                       check=True, capture_output=True)
        print_profile(raw, f"`kdwatch analyze` on Parquet, {args.n:,} predictions (flame graph: {OUT / 'analyze.svg'})",
                      args.top, root="analyze (cli.py)")


if __name__ == "__main__":
    main()
