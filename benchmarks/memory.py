"""Collector memory over a long stream: RSS after 1M and after 10M events, and bytes of state per window.

One `kdwatch collect` process (defaults: 1-minute windows, 10-minute grace, transfer set on)
consumes N predictions (10 classes, 10 features, 10 % teacher replays, 10 % labels; 200 events per
second of event time) from a 4-partition topic of the local broker into SQLite. Its resident set
(/proc/<pid>/status VmRSS) is sampled every 3 seconds; the table gives it as each checkpoint of stored
predictions is passed, and the peak (VmHWM). State bytes: the stored `window_state` rows (one per
window and partition, JSON) and the windows merged across partitions, as stored and as read.

    python benchmarks/memory.py [--n 10000000] [--checkpoints 1000000,10000000]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
from common import ROOT
from ingest import collector_env, local_broker
from sqlalchemy import func, select

from kdwatch.generator import TrafficSpec, generate
from kdwatch.loadgen import produce_records
from kdwatch.storage.schema import window_state
from kdwatch.storage.sql import SqlStore


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--checkpoints", default="1000000,10000000")
    args = parser.parse_args()
    checkpoints = sorted(int(c) for c in args.checkpoints.split(","))
    with local_broker() as (info, topics, home):
        spec = TrafficSpec(n_classes=10, n_features=10, teacher_rate=0.10, label_rate=0.10,
                           events_per_second=200.0, seed=11)
        # The producer runs while the collector consumes (generating 11M records alone takes ~15 min).
        produced: list[int] = []
        t0 = time.perf_counter()
        producer = threading.Thread(target=lambda: produced.append(produce_records(
            info.bootstrap, {"prediction": topics.predictions, "teacher": topics.teacher, "label": topics.labels},
            generate(spec, args.n))), daemon=True)
        producer.start()
        db = home / "memory.db"
        store = SqlStore.from_url(f"sqlite:///{db}")
        store.migrate()
        log = (home / "collector.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "kdwatch.cli", "collect", "--idle-exit", "60"],
                                env=collector_env(info.bootstrap, topics, db), cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
        samples: list[tuple[int, int]] = []  # (stored predictions, RSS kB)
        start = time.perf_counter()
        peak = 0
        pending = list(checkpoints)
        while proc.poll() is None:
            try:
                rss = status_kb(proc.pid, "VmRSS")
                peak = status_kb(proc.pid, "VmHWM")
            except (FileNotFoundError, KeyError):
                break
            with store.engine.connect() as conn:
                stored = sum(orjson.loads(s)["n"] for (s,) in conn.execute(select(window_state.c.state)))
            samples.append((stored, rss))
            while pending and stored >= pending[0]:
                print(f"{pending.pop(0):,} stored: RSS {rss / 1024:.0f} MB "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
            if not pending and stored >= args.n:
                break
            if not producer.is_alive() and not produced:
                raise RuntimeError("the producer failed")
            time.sleep(3.0)
        print(f"produced {produced[0]:,} records in {time.perf_counter() - t0:.0f} s; collector done", flush=True)
        records = produced[0]
        code = proc.poll()
        if code is not None:
            tail = (home / "collector.log").read_text(errors="replace")[-3000:]
            print(f"the collector exited with {code} after {samples[-1][0] if samples else 0:,} stored:\n{tail}", flush=True)
        proc.terminate()
        proc.wait(60)
        log.close()
        with store.engine.connect() as conn:
            rows = conn.execute(select(func.count(), func.avg(func.length(window_state.c.state)),
                                       func.max(func.length(window_state.c.state)))).one()
        merged = store.windows()
        merged_bytes = [len(orjson.dumps(state.to_dict())) for state, _f, _w in merged.values()]
        store.close()

    print(f"\n{args.n:,} predictions ({records:,} records), one collector process, SQLite\n")
    print("| stored predictions | collector RSS MB |")
    print("|---|---|")
    for mark in checkpoints:
        at = next((rss for stored, rss in samples if stored >= mark), None)
        print(f"| {mark:,} | {'not reached' if at is None else f'{at / 1024:.0f}'} |")
    steady = [rss for stored, rss in samples if stored >= checkpoints[0]]
    if steady:
        print(f"| {checkpoints[0]:,} to the end: min / median / max | {min(steady) / 1024:.0f} / "
              f"{statistics.median(steady) / 1024:.0f} / {max(steady) / 1024:.0f} |")
    print(f"| peak (VmHWM) | {peak / 1024:.0f} |")
    print(f"\nstate per (model, window, partition) row: mean {rows[1]:,.0f} B, max {rows[2]:,} B over {rows[0]:,} rows;"
          f" per (model, window) merged over partitions: mean {statistics.mean(merged_bytes):,.0f} B over "
          f"{len(merged_bytes):,} windows")


if __name__ == "__main__":
    main()
