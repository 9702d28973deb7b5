"""History on Spark: `kdwatch.spark.analyze` on local[1] and local[2], and memory as the data grows.

The benchmark's traffic (10 classes, 10 features, 10 % replays and labels) as JSONL; partitions scale
with the data (one co-partition per 250,000 predictions, as a job would size them). Reported: wall
seconds of the whole job (start-up excluded: the session is warm) on local[1] and local[2], records per
second per core, the largest resident memory of a Python worker at N and at 5N predictions (``--memory-factor``), and the
estimate for a month of traffic from the measured per-core rate.

    python benchmarks/spark_scale.py [--n 10000000] [--runs 2] [--memory-factor 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

from common import ROOT, dataset

sys.path.insert(0, str(ROOT))

from kdwatch import spark as on_spark

PER_PARTITION = 250_000


def worker_peak_mb(stop: threading.Event, peak: list[float]) -> None:
    """The largest RSS of any PySpark Python worker seen while ``stop`` is unset (sampled every 0.2 s from /proc)."""
    while not stop.is_set():
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (proc / "cmdline").read_bytes()
                if b"pyspark.daemon" not in cmdline and b"pyspark.worker" not in cmdline:
                    continue
                status = (proc / "status").read_text()
            except OSError:
                continue  # a process that just exited
            rss_kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
            peak[0] = max(peak[0], rss_kb / 1024)
        stop.wait(0.2)


def job(master: str, paths: dict[str, Path], n: int, runs: int) -> tuple[float, float, int]:
    """Median seconds, worker peak MB and records for ``runs`` analyses on ``master``."""
    session = on_spark.session(master, "kdwatch-bench", **{"spark.sql.shuffle.partitions": str(max(2, n // PER_PARTITION))})
    records = sum(1 for p in paths.values() for _ in p.open("rb"))
    seconds, peak = [], [0.0]
    try:
        for _ in range(runs):
            stop = threading.Event()
            sampler = threading.Thread(target=worker_peak_mb, args=(stop, peak), daemon=True)
            sampler.start()
            began = time.perf_counter()
            rows, _counters = on_spark.collect(*on_spark.analyze(session, paths["prediction"], paths["teacher"], paths["label"],
                                                                 partitions=max(1, n // PER_PARTITION)))
            seconds.append(time.perf_counter() - began)
            stop.set()
            sampler.join()
            assert rows, "no windows"
    finally:
        session.stop()
    return statistics.median(seconds), peak[0], records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--memory-factor", type=float, default=5.0, help="memory is also measured at this many times N")
    args = parser.parse_args()
    small = dataset(args.n)
    one, peak_one, records = job("local[1]", small, args.n, args.runs)
    two, peak_two, _ = job("local[2]", small, args.n, args.runs)
    big_n = int(args.memory_factor * args.n)
    _, peak_big, _ = job("local[2]", dataset(big_n), big_n, 1)
    per_core = records / one
    print(f"\nkdwatch.spark.analyze, {args.n:,} predictions ({records:,} records with replays and labels), "
          f"{max(1, args.n // PER_PARTITION)} co-partitions; median of {args.runs} runs\n")
    print("| master | seconds | records/s | speed-up | Python worker peak RSS MB |")
    print("|---|---|---|---|---|")
    print(f"| local[1] | {one:.1f} | {records / one:,.0f} | 1.00 | {peak_one:.0f} |")
    print(f"| local[2] | {two:.1f} | {records / two:,.0f} | {one / two:.2f} | {peak_two:.0f} |")
    print(f"\nworker peak RSS at {args.n:,} predictions: {peak_two:.0f} MB; at {big_n:,}: {peak_big:.0f} MB "
          f"(co-partitions of {PER_PARTITION:,} predictions each)")
    for rps in (1_000, 10_000):
        month = rps * 86_400 * 30 * records / args.n
        core_hours = month / per_core / 3_600
        print(f"a month at {rps:,} requests/s: {month / 1e9:.1f} billion records, {core_hours:,.0f} core-hours at "
              f"{per_core:,.0f} records/s per core: {core_hours / 64:.1f} h on 64 cores, {core_hours / 256:.1f} h on 256")


if __name__ == "__main__":
    main()
