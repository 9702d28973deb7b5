"""Offline analysis speed and memory: `kdwatch analyze` against Evidently on the same data.

kdwatch computes every window field (agreement, KL, JS, ECE, accuracy, PSI on 10 features plus
confidence and predicted class, latency quantiles) over predictions + 10 % replays + 10 % labels;
Evidently's DataDriftPreset(method="psi") computes PSI on the 10 features only (reference 1M rows).
Both are median wall seconds of several runs in this same process tree, so their ratio is fair on a
noisy machine. Memory: kdwatch's peak RSS at N and at 5N predictions (flat = bounded state).

    python benchmarks/analyze_vs_peers.py [--n 1000000] [--runs 3] [--memory-factor 5]
"""

from __future__ import annotations

import argparse
import json
import sys

from common import ROOT, dataset, measure, median

KDWATCH = str(ROOT / ".venv" / "bin" / "kdwatch")
BENCH_PY = str(ROOT / ".venv-bench" / "bin" / "python")


def kdwatch_cmd(paths: dict[str, object], reference: object) -> list[str]:
    return [KDWATCH, "analyze", "--predictions", str(paths["prediction"]), "--teacher", str(paths["teacher"]),
            "--labels", str(paths["label"]), "--reference", str(reference)]


FLOOR = """
import sys, orjson
n = 0
for path in sys.argv[1:]:
    with open(path, "rb") as handle:
        for line in handle:
            orjson.loads(line)
            n += 1
print(n)
"""


def floor_cmd(paths: dict[str, object], reference: object) -> list[str]:
    """Reading and parsing every JSONL line of the inputs and the reference with orjson, computing nothing."""
    return [sys.executable, "-c", FLOOR, *(str(p) for p in paths.values()), str(reference)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory-factor", type=int, default=5)
    args = parser.parse_args()

    current = dataset(args.n, seed=0)
    reference = dataset(args.n, seed=1)["prediction"]
    records = 0
    for path in current.values():
        with open(path, "rb") as handle:
            records += sum(1 for _ in handle)

    kd = [measure(kdwatch_cmd(current, reference)) for _ in range(args.runs)]
    ev = [measure([BENCH_PY, str(ROOT / "benchmarks" / "peers" / "evidently_psi.py"), str(current["prediction"]), str(reference)])
          for _ in range(args.runs)]
    ev_parts = [json.loads(m.stdout.splitlines()[-1]) for m in ev]
    floor = [measure(floor_cmd(current, reference)) for _ in range(args.runs)]
    big = dataset(args.n * args.memory_factor, seed=2)
    kd_big = measure(kdwatch_cmd(big, reference))

    kd_s, ev_s = median([m.seconds for m in kd]), median([m.seconds for m in ev])
    rows = [
        ("kdwatch analyze (all fields)", kd_s, median([m.peak_rss_mb for m in kd]), args.n / kd_s),
        ("Evidently DataDriftPreset(psi), total", ev_s, median([m.peak_rss_mb for m in ev]), args.n / ev_s),
        ("  of which Report.run", median([p["run_s"] for p in ev_parts]), None, None),
        ("floor: orjson-parse every input and reference line, no compute", median([m.seconds for m in floor]),
         median([m.peak_rss_mb for m in floor]), args.n / median([m.seconds for m in floor])),
        (f"kdwatch analyze at {args.n * args.memory_factor:,} predictions", kd_big.seconds, kd_big.peak_rss_mb,
         args.n * args.memory_factor / kd_big.seconds),
    ]
    print(f"\n{args.n:,} predictions ({records:,} records with replays and labels), median of {args.runs} runs\n")
    print("| run | seconds | peak RSS MB | predictions/s |")
    print("|---|---|---|---|")
    for name, seconds, rss, rate in rows:
        print(f"| {name} | {seconds:.2f} | {'' if rss is None else f'{rss:.0f}'} | {'' if rate is None else f'{rate:,.0f}'} |")
    print(f"\nspeed-up of kdwatch over Evidently (total): {ev_s / kd_s:.2f}x (target >= 20x)")
    floor_s = median([m.seconds for m in floor])
    print(f"best possible for any tool that parses the JSONL in Python: {ev_s / floor_s:.2f}x over Evidently")
    print(f"kdwatch peak RSS {args.memory_factor}x more events: {kd_big.peak_rss_mb / median([m.peak_rss_mb for m in kd]):.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
