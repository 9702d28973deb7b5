"""Offline analysis speed and memory: `kdwatch analyze` against Evidently on the same data.

kdwatch computes every window field (agreement, KL, JS, ECE, accuracy, PSI on 10 features plus
confidence and predicted class, latency quantiles) over predictions + 10 % replays + 10 % labels;
Evidently's DataDriftPreset(method="psi") computes PSI on the 10 features only (reference 1M rows).
Both are median wall seconds of several runs in this same process tree, so their ratio is fair on a
noisy machine. Each is run twice: on the JSONL files, and on the same events as Parquet (written by
`kdwatch convert`; kdwatch takes its columnar path, Evidently reads the feature columns). Memory:
kdwatch's peak RSS at N and at 5N predictions (flat = bounded state).

    python benchmarks/analyze_vs_peers.py [--n 1000000] [--runs 3] [--memory-factor 5]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import Any

from common import FLOOR, ROOT, dataset, measure, median, parquet_dataset

KDWATCH = str(ROOT / ".venv" / "bin" / "kdwatch")
BENCH_PY = str(ROOT / ".venv-bench" / "bin" / "python")


def kdwatch_cmd(paths: Mapping[str, object], reference: object) -> list[str]:
    return [KDWATCH, "analyze", "--predictions", str(paths["prediction"]), "--teacher", str(paths["teacher"]),
            "--labels", str(paths["label"]), "--reference", str(reference)]





def floor_cmd(paths: Mapping[str, object], reference: object) -> list[str]:
    """Reading and parsing every JSONL line of the inputs and the reference with orjson, computing nothing."""
    return [sys.executable, "-c", FLOOR, *(str(p) for p in paths.values()), str(reference)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory-factor", type=int, default=5)
    parser.add_argument("--formats", default="jsonl,parquet", help="which inputs to run: jsonl, parquet or both")
    parser.add_argument("--duplicates", type=float, default=0.005,
                        help="share of records sent twice, as at-least-once producers do (issue 16: 0.5 %%)")
    args = parser.parse_args()
    formats = set(args.formats.split(","))

    current = dataset(args.n, seed=0, duplicates=args.duplicates)
    reference = dataset(args.n, seed=1)["prediction"]
    current_pq = parquet_dataset(current)
    reference_pq = parquet_dataset({"prediction": reference})["prediction"]
    records = 0
    for path in current.values():
        with open(path, "rb") as handle:
            records += sum(1 for _ in handle)
    evidently = str(ROOT / "benchmarks" / "peers" / "evidently_psi.py")

    def runs(cmd: list[str], wanted: str) -> list[Any]:
        return [measure(cmd) for _ in range(args.runs)] if wanted in formats else []

    kd = runs(kdwatch_cmd(current, reference), "jsonl")
    ev = runs([BENCH_PY, evidently, str(current["prediction"]), str(reference)], "jsonl")
    kd_pq = runs(kdwatch_cmd(current_pq, reference_pq), "parquet")
    ev_pq = runs([BENCH_PY, evidently, str(current_pq["prediction"]), str(reference_pq)], "parquet")
    floor = runs(floor_cmd(current, reference), "jsonl")
    big = dataset(args.n * args.memory_factor, seed=2, duplicates=args.duplicates)
    kd_big = measure(kdwatch_cmd(big, reference)) if "jsonl" in formats else None
    kd_big_pq = measure(kdwatch_cmd(parquet_dataset(big), reference_pq)) if "parquet" in formats else None

    def seconds(ms: list[Any]) -> float:
        return median([m.seconds for m in ms])

    def rss(ms: list[Any]) -> float:
        return median([m.peak_rss_mb for m in ms])

    def run_s(ms: list[Any]) -> float:
        return median([json.loads(m.stdout.splitlines()[-1])["run_s"] for m in ms])

    big_n = args.n * args.memory_factor
    rows: list[tuple[str, float, float | None, float | None]] = []
    if "jsonl" in formats:
        assert kd_big is not None
        rows += [
            ("JSONL: kdwatch analyze (all fields)", seconds(kd), rss(kd), args.n / seconds(kd)),
            ("JSONL: Evidently DataDriftPreset(psi), total", seconds(ev), rss(ev), args.n / seconds(ev)),
            ("  of which Report.run", run_s(ev), None, None),
            ("JSONL floor: orjson-parse every input and reference line, no compute", seconds(floor), rss(floor),
             args.n / seconds(floor)),
            (f"JSONL: kdwatch analyze at {big_n:,} predictions", kd_big.seconds, kd_big.peak_rss_mb, big_n / kd_big.seconds),
        ]
    if "parquet" in formats:
        assert kd_big_pq is not None
        rows += [
            ("Parquet: kdwatch analyze (all fields, columnar path)", seconds(kd_pq), rss(kd_pq), args.n / seconds(kd_pq)),
            ("Parquet: Evidently DataDriftPreset(psi), total", seconds(ev_pq), rss(ev_pq), args.n / seconds(ev_pq)),
            ("  of which Report.run", run_s(ev_pq), None, None),
            (f"Parquet: kdwatch analyze at {big_n:,} predictions", kd_big_pq.seconds, kd_big_pq.peak_rss_mb,
             big_n / kd_big_pq.seconds),
        ]
    print(f"\n{args.n:,} predictions ({records:,} records with replays and labels, {args.duplicates:.1%} of them sent twice), "
          f"median of {args.runs} runs\n")
    print("| run | seconds | peak RSS MB | predictions/s |")
    print("|---|---|---|---|")
    for name, secs, mb, rate in rows:
        print(f"| {name} | {secs:.2f} | {'' if mb is None else f'{mb:.0f}'} | {'' if rate is None else f'{rate:,.0f}'} |")
    print()
    if "jsonl" in formats:
        assert kd_big is not None
        print(f"speed-up of kdwatch over Evidently, both reading JSONL: {seconds(ev) / seconds(kd):.2f}x (target >= 5x)")
        print(f"best possible for any tool that parses the JSONL in Python: {seconds(ev) / seconds(floor):.2f}x over Evidently")
        print(f"kdwatch peak RSS, JSONL, {args.memory_factor}x more events: {kd_big.peak_rss_mb / rss(kd):.2f}x")
    if "parquet" in formats:
        assert kd_big_pq is not None
        print(f"speed-up of kdwatch over Evidently, both reading Parquet: {seconds(ev_pq) / seconds(kd_pq):.2f}x (target >= 10x, goal 20x)")
        print(f"kdwatch peak RSS, Parquet, {args.memory_factor}x more events: {kd_big_pq.peak_rss_mb / rss(kd_pq):.2f}x")
    if formats >= {"jsonl", "parquet"}:
        print(f"kdwatch on Parquet vs Evidently on JSONL: {seconds(ev) / seconds(kd_pq):.2f}x")
    sys.stdout.flush()

if __name__ == "__main__":
    main()
