"""Ingest: a bare kafka-python consumer against the full collector on the same topic; one vs two
collectors in one consumer group; the collector's peak memory at N and 4N events.

All against a local Apache Kafka broker started here (4-partition topics) and SQLite. Rates are
events per second from the first event processed to the last (consumer-group joins excluded),
medians of several runs.

    python benchmarks/ingest.py [--n 200000] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common import ROOT, median
from kafka import KafkaConsumer, TopicPartition

from kdwatch.collector.consumer import Collector, CollectorConfig, Topics, ensure_topics
from kdwatch.devkafka import BrokerInfo, DevKafka
from kdwatch.generator import TrafficSpec, generate
from kdwatch.loadgen import produce_records
from kdwatch.runtime import tune_gc
from kdwatch.storage.sql import SqlStore


def new_topics(bootstrap: str) -> Topics:
    run = f"bench{uuid.uuid4().hex[:8]}"
    topics = Topics(f"{run}.predictions", f"{run}.teacher", f"{run}.labels")
    ensure_topics(bootstrap, [topics.predictions, topics.teacher, topics.labels], 4)
    return topics


def fill(bootstrap: str, topics: Topics, n: int) -> None:
    """``n`` predictions (10 classes, 10 features) only: the ceiling compares like with like."""
    spec = TrafficSpec(teacher_rate=0.0, label_rate=0.0, events_per_second=200.0, seed=5)
    produce_records(bootstrap, {"prediction": topics.predictions, "teacher": topics.teacher, "label": topics.labels},
                    generate(spec, n))


@contextmanager
def local_broker() -> Iterator[tuple[BrokerInfo, Topics, Path]]:
    """A local broker with fresh (empty) topics, and a scratch folder; stopped afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        broker = DevKafka(home / "kafka")
        info = broker.start()
        try:
            yield info, new_topics(info.bootstrap), home
        finally:
            broker.stop()


@contextmanager
def filled_broker(n: int) -> Iterator[tuple[BrokerInfo, Topics, Path]]:
    """A local broker with ``n`` predictions on fresh topics, and a scratch folder; stopped afterwards."""
    with local_broker() as (info, topics, home):
        fill(info.bootstrap, topics, n)
        yield info, topics, home


def collector_env(bootstrap: str, topics: Topics, db: Path, **extra: str) -> dict[str, str]:
    """The environment of a `kdwatch collect` process on these topics, in a new consumer group.

    Everything is produced before the collector starts, so an input at its end has nothing more to come:
    a 1 s idle timeout only shortens the tail (the default, 30 s, would add 30 s to every run).
    """
    return {**os.environ, "KDWATCH_DATABASE_URL": f"sqlite:///{db}", "KDWATCH_BOOTSTRAP_SERVERS": bootstrap,
            "KDWATCH_GROUP_ID": f"g-{uuid.uuid4().hex[:8]}", "KDWATCH_TOPIC_PREDICTIONS": topics.predictions,
            "KDWATCH_TOPIC_TEACHER": topics.teacher, "KDWATCH_TOPIC_LABELS": topics.labels, "KDWATCH_IDLE_TIMEOUT": "1s",
            **extra}


def bare_consumer(bootstrap: str, topic: str, n: int) -> float:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_poll_records=5_000,
                             fetch_max_bytes=64 * 1024 * 1024)
    parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    seen, first = 0, None
    while seen < n:
        for records in consumer.poll(timeout_ms=1_000).values():
            if first is None:
                first = time.perf_counter()
            seen += len(records)
    assert first is not None
    elapsed = time.perf_counter() - first
    consumer.close()
    return n / elapsed


def collector_in_process(bootstrap: str, topics: Topics, n: int, db: Path) -> float:
    """The collector on a thread of this process, tuned as `kdwatch collect` is (kdwatch.runtime.tune_gc)."""
    tune_gc()
    store = SqlStore.from_url(f"sqlite:///{db}")
    store.migrate()
    collector = Collector(CollectorConfig(bootstrap, group_id=f"g-{uuid.uuid4().hex[:8]}", topics=topics, idle_timeout_ms=1_000),
                          store)
    stop = threading.Event()
    thread = threading.Thread(target=collector.run, kwargs={"stop": stop}, daemon=True)
    thread.start()
    while collector.processed == 0:
        time.sleep(0.005)
    first = time.perf_counter()
    while collector.processed < n:
        time.sleep(0.005)
    elapsed = time.perf_counter() - first
    stop.set()
    thread.join(30)
    store.close()
    return n / elapsed


def collectors_as_processes(bootstrap: str, topics: Topics, n: int, db: Path, count: int) -> tuple[float, list[int]]:
    """``count`` `kdwatch collect` processes in one group: events/s and each one's peak RSS (kB)."""
    store = SqlStore.from_url(f"sqlite:///{db}")
    store.migrate()
    env = collector_env(bootstrap, topics, db, KDWATCH_SESSION_TIMEOUT="6s")
    procs = [subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "peak.py"), sys.executable, "-m", "kdwatch.cli",
                               "collect", "--idle-exit", "4"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
             for _ in range(count)]

    group = env["KDWATCH_GROUP_ID"]

    def stored() -> int:
        """Predictions processed: the offsets committed with the state (open windows are stored only now and then)."""
        return sum(offset for (g, topic, _p), offset in store.offsets().items() if g == group and topic == topics.predictions)

    while stored() == 0:
        time.sleep(0.05)
    first = time.perf_counter()
    while stored() < n:
        time.sleep(0.05)
    elapsed = time.perf_counter() - first
    peaks = [int(p.communicate(timeout=120)[0].decode().split()[-1]) for p in procs]
    store.close()
    return n / elapsed, peaks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory-factor", type=int, default=4)
    args = parser.parse_args()
    with filled_broker(args.n) as (info, topics, home):
        bare, full = [], []
        for i in range(args.runs):  # interleaved, so a slow spell of the machine hits every contender
            bare.append(bare_consumer(info.bootstrap, topics.predictions, args.n))
            full.append(collector_in_process(info.bootstrap, topics, args.n, home / f"collector{i}.db"))
        one = [collectors_as_processes(info.bootstrap, topics, args.n, home / f"one{i}.db", 1) for i in range(args.runs)]
        two = [collectors_as_processes(info.bootstrap, topics, args.n, home / f"two{i}.db", 2) for i in range(args.runs)]
        big = None
        if args.memory_factor > 1:
            big_topics = new_topics(info.bootstrap)
            fill(info.bootstrap, big_topics, args.n * args.memory_factor)
            big = collectors_as_processes(info.bootstrap, big_topics, args.n * args.memory_factor, home / "big.db", 1)
    bare_rate, full_rate = median(bare), median(full)
    print(f"\n{args.n:,} predictions on a 4-partition topic, SQLite, median of {args.runs} runs\n")
    print("| run | events/s |")
    print("|---|---|")
    print(f"| bare kafka-python consumer (no processing) | {bare_rate:,.0f} |")
    print(f"| collector (validate, join, window, persist), in process | {full_rate:,.0f} |")
    print(f"| 1 `kdwatch collect` process | {median([r for r, _p in one]):,.0f} |")
    print(f"| 2 `kdwatch collect` processes, one group | {median([r for r, _p in two]):,.0f} |")
    print(f"\ncollector / bare consumer: {full_rate / bare_rate:.2f} (target >= 0.5, goal 0.7); "
          f"collector {full_rate:,.0f} events/s (target >= 100,000)")
    print(f"scale-out 2 vs 1 process: {median([r for r, _p in two]) / median([r for r, _p in one]):.2f}x")
    small_peak = median([float(p[0]) for _r, p in one]) / 1024
    if big is not None:
        print(f"collector peak RSS: {small_peak:.0f} MB after {args.n:,} events, {big[1][0] / 1024:.0f} MB after "
              f"{args.n * args.memory_factor:,}")


if __name__ == "__main__":
    main()
