"""Where `kdwatch analyze` spends its time: py-spy samples the columnar engine over N predictions (JSONL or Parquet).

The same data as analyze_vs_peers.py (10 % replays, 10 % labels, a reference of N predictions).
Writes the flame graph (benchmarks/profiles/analyze.svg) and prints the functions with the most
samples; with --native, time inside numpy and Arrow shows under their own frames.

    python benchmarks/profile_analyze.py [--n 1000000] [--format parquet|jsonl] [--duplicates 0.005]
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
    parser.add_argument("--format", choices=("parquet", "jsonl"), default="parquet")
    parser.add_argument("--duplicates", type=float, default=0.005, help="share of records sent twice")
    args = parser.parse_args()
    spy = py_spy()
    OUT.mkdir(exist_ok=True)
    current = dataset(args.n, seed=0, duplicates=args.duplicates)
    reference = dataset(args.n, seed=1)["prediction"]
    if args.format == "parquet":
        current = parquet_dataset(current)
        reference = parquet_dataset({"prediction": reference})["prediction"]
    analyze = [str(ROOT / ".venv" / "bin" / "python"), "-m", "kdwatch.cli", "analyze",
               "--predictions", str(current["prediction"]), "--teacher", str(current["teacher"]),
               "--labels", str(current["label"]), "--reference", str(reference)]
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "stacks.txt"
        subprocess.run([spy, "record", "--rate", "250", "--native", "--format", "raw", "-o", str(raw), "--", *analyze],
                       check=True, capture_output=True)
        subprocess.run([spy, "record", "--rate", "100", "-o", str(OUT / "analyze.svg"), "--", *analyze],
                       check=True, capture_output=True)
        print_profile(raw, f"`kdwatch analyze` on {args.format}, {args.n:,} predictions (flame graph: {OUT / 'analyze.svg'})",
                      args.top, root="analyze (cli.py)")


if __name__ == "__main__":
    main()
