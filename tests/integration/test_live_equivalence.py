"""Live = offline while producers write in bursts: windows and counters do not depend on fetch timing.

A producer writes the three topics in bursts, concurrently with the collectors: some minutes of event
time of predictions, then the matching teacher replays and labels, each topic lagging the predictions
by a random share (up to 80 %) of the grace, with random pauses and burst sizes. One collector, two
collectors in a group, or a collector SIGKILLed at random moments and restarted, consume at the same
time. The stored windows and counters must equal ``kdwatch analyze`` on the same events with the
topics' partition layout, field by field. `make test` runs a few seeds, `make soak` at least 20.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka import KafkaProducer

from kdwatch.collector.column_state import early_from
from kdwatch.collector.consumer import Collector, CollectorConfig, kafka_partition
from kdwatch.collector.offline import analyze_files
from kdwatch.generator import GenerativeSpec, TrafficSpec, generate, generate_generative
from kdwatch.storage.sql import SqlStore
from tests.integration.helpers import (
    collector_process,
    differences,
    explain,
    new_topics,
    read_topic,
    stored_results,
    topic_map,
    window_results,
    write_jsonl,
)

WINDOW_MS, GRACE_MS = 10_000, 60_000
IDLE_MS = 8_000  # longer than any wall-clock gap the producer leaves in one topic
PARTITIONS = 3
# (collectors, database, traffic): one in-process collector, two processes in a group, one process killed and
# restarted, with a classifier student; and a generative (language-model) student's traffic under kills.
MODES = [("one", "sqlite", "classifier"), ("two", "postgresql", "classifier"), ("kills", "sqlite", "classifier"),
         ("kills", "postgresql", "generative")]
SEEDS = int(os.environ.get("KDWATCH_LIVE_SEEDS", "1"))  # per mode; `make soak` sets 20 (80 runs)


def _bursts(records: list[tuple[str, str, bytes]], rng: random.Random) -> list[list[tuple[str, str, bytes]]]:
    """The records cut into bursts: predictions up to an event time, then replays and labels lagging behind."""
    by_kind: dict[str, list[tuple[int, tuple[str, str, bytes]]]] = {"prediction": [], "teacher": [], "label": []}
    for record in records:
        by_kind[record[0]].append((orjson.loads(record[2])["ts"], record))
    cursor = {kind: 0 for kind in by_kind}
    start = by_kind["prediction"][0][0]
    end = max(ts for rows in by_kind.values() for ts, _r in rows)
    horizon = start
    bursts = []
    while any(cursor[k] < len(rows) for k, rows in by_kind.items()):
        horizon += rng.randint(2_000, 15_000)  # 2 to 15 s of event time per burst
        burst = []
        for kind, rows in by_kind.items():
            lag = 0 if kind == "prediction" else rng.randint(0, int(0.8 * GRACE_MS))
            limit = horizon - lag if horizon < end else end + 1
            while cursor[kind] < len(rows) and rows[cursor[kind]][0] < limit:
                burst.append(rows[cursor[kind]][1])
                cursor[kind] += 1
        bursts.append(burst)
    return bursts


def _produce(kafka: str, topics: dict[str, str], bursts: list[list[tuple[str, str, bytes]]], rng: random.Random,
             sent: list[tuple[str, str, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=kafka, acks="all", linger_ms=5, max_in_flight_requests_per_connection=1)
    try:
        for burst in bursts:
            for kind, request_id, value in burst:
                producer.send(topics[kind], key=request_id.encode(), value=value)
                sent.append((kind, request_id, value))
            producer.flush(timeout=60)
            time.sleep(rng.uniform(0.0, 0.6))
    finally:
        producer.close(timeout=30)


def _consume_in_thread(kafka: str, topics: Any, store: SqlStore, rng: random.Random, done: threading.Event) -> None:
    config = CollectorConfig(kafka, group_id="live-" + topics.predictions, topics=topics, window_ms=WINDOW_MS, grace_ms=GRACE_MS,
                             idle_timeout_ms=IDLE_MS, max_poll_records=rng.choice([37, 200, 1_000, 5_000]))
    collector = Collector(config, store)
    stop = threading.Event()
    thread = threading.Thread(target=collector.run, kwargs={"stop": stop}, daemon=True)
    thread.start()
    done.wait(600)
    _wait_until_caught_up(lambda: collector.processed, done)
    stop.set()
    thread.join(60)


def _wait_until_caught_up(processed: Any, done: threading.Event) -> None:
    """Until the count stops moving for longer than the idle timeout (the tail waits one idle timeout)."""
    last, since = -1, time.monotonic()
    while time.monotonic() - since < IDLE_MS / 1000 + 4:
        now = processed()
        if now != last:
            last, since = now, time.monotonic()
        time.sleep(0.2)


def _consume_in_processes(kafka: str, database_url: str, topics: Any, tmp_path: Path, rng: random.Random,
                          done: threading.Event, members: int, kills: int) -> None:
    group = "live-" + topics.predictions
    log = tmp_path / "collector.log"
    env = {"KDWATCH_WINDOW": f"{WINDOW_MS}ms", "KDWATCH_GRACE": f"{GRACE_MS}ms"}

    def start() -> Any:
        return collector_process(kafka, database_url, topics, group, log, max_poll_records=rng.choice([37, 200, 1_000]),
                                 idle_timeout_ms=IDLE_MS, extra_env=env)

    procs = [start() for _ in range(members)]
    for _ in range(kills):
        time.sleep(rng.uniform(1.0, 4.0))
        victim = rng.randrange(len(procs))
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait()
        procs[victim] = start()
    done.wait(600)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    # One last member reads whatever is left and exits once everything is processed and quiet.
    final = collector_process(kafka, database_url, topics, group, log, idle_exit=IDLE_MS / 1000 + 5, idle_timeout_ms=IDLE_MS, extra_env=env)
    assert final.wait(timeout=300) == 0, log.read_text()[-3000:]


@pytest.mark.parametrize(("mode", "database_url", "traffic"), MODES, indirect=["database_url"])
@pytest.mark.parametrize("seed", range(SEEDS))
def test_windows_stored_while_producers_write_in_bursts_equal_the_offline_analysis(
        kafka: str, database_url: str, store: SqlStore, tmp_path: Path, mode: str, traffic: str, seed: int) -> None:
    rng = random.Random(f"{mode}-{traffic}-{seed}")
    if traffic == "generative":
        records = list(generate_generative(GenerativeSpec(seed=2000 + seed, events_per_second=20, teacher_rate=0.4,
                                                          audit_rate=0.03), 2_000))
    else:
        spec = TrafficSpec(seed=1000 + seed, events_per_second=20, teacher_rate=0.4, label_rate=0.3, audit_rate=0.03)
        records = list(generate(spec, 3_000))
    topics = new_topics(kafka, partitions=PARTITIONS)
    sent: list[tuple[str, str, bytes]] = []
    done = threading.Event()
    bursts = _bursts(records, rng)

    def produce() -> None:
        try:
            _produce(kafka, topic_map(topics), bursts, rng, sent)
        finally:
            done.set()

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    if mode == "one":
        _consume_in_thread(kafka, topics, store, rng, done)
    else:
        _consume_in_processes(kafka, database_url, topics, tmp_path, rng, done, members=2 if mode == "two" else 1,
                              kills=3 if mode == "kills" else 0)
    producer.join(60)
    assert len(sent) == len(records)

    # The offline truth: the same events in the order each topic received them, joined per partition.
    paths = write_jsonl(sent, tmp_path / "events")
    windows, counters = analyze_files(paths["prediction"], paths["teacher"], paths["label"], window_ms=WINDOW_MS,
                                      grace_ms=GRACE_MS, partitions=PARTITIONS, partitioner=kafka_partition)
    expected = window_results(windows, WINDOW_MS)
    stored = stored_results(store)
    assert sum(r["n_joined"] for r in stored.values()) > 0
    diffs = differences(stored, expected)
    assert not diffs, explain(diffs)
    # Offline, the end of the files closes every window; live, the newest windows are still open, and the
    # replays and labels still waiting there for a prediction count as unmatched only when they close.
    live = dict(store.counters())
    for (kind, reason), count in waiting(store).items():
        live[(kind, reason)] = live.get((kind, reason), 0) + count
    assert {k: v for k, v in live.items() if v} == {k: v for k, v in counters.items() if v}


def waiting(store: SqlStore, partitions: int = PARTITIONS) -> Counter[tuple[str, str]]:
    """Replays and labels still waiting for their prediction in open windows, as (kind, "unmatched") counts."""
    out: Counter[tuple[str, str]] = Counter()
    for p in range(partitions):
        for kind, _model, _seq, blob in store.load_engine(p)[1]:
            if kind in ("teacher", "label"):
                out[(kind, "unmatched")] += early_from(blob, kind)[0].n
    return out


@pytest.mark.parametrize(("silence_s", "loses"), [(1.0, False), (7.0, True)])
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_replayer_silent_shorter_than_the_idle_timeout_loses_nothing_and_longer_makes_replays_late(
        kafka: str, store: SqlStore, silence_s: float, loses: bool) -> None:
    idle_ms, grace_ms = 3_000, 30_000
    records = list(generate(TrafficSpec(seed=5, events_per_second=10, teacher_rate=0.5, label_rate=0.0), 1_500))
    predictions = [r for r in records if r[0] == "prediction"]
    replays = [r for r in records if r[0] == "teacher"]
    topics = new_topics(kafka, partitions=1)
    config = CollectorConfig(kafka, group_id="lag-" + topics.predictions, topics=topics, window_ms=WINDOW_MS, grace_ms=grace_ms,
                             idle_timeout_ms=idle_ms)
    collector = Collector(config, store)
    stop = threading.Event()
    thread = threading.Thread(target=collector.run, kwargs={"stop": stop}, daemon=True)
    thread.start()
    producer = KafkaProducer(bootstrap_servers=kafka, acks="all", linger_ms=5)
    for _kind, request_id, value in predictions:
        producer.send(topics.predictions, key=request_id.encode(), value=value)
    producer.flush(timeout=60)
    time.sleep(silence_s)  # the replayer is behind: its topic has nothing, and is at its end
    for _kind, request_id, value in replays:
        producer.send(topics.teacher, key=request_id.encode(), value=value)
    producer.close(timeout=30)
    _wait_until_caught_up(lambda: collector.processed, threading.Event())
    stop.set()
    thread.join(60)

    assert collector.processed == len(predictions) + len(replays)
    joined = sum(r["n_joined"] for r in stored_results(store).values())
    late = [h for _k, _v, h in read_topic(kafka, topics.teacher + ".DLT") if h.get("kdwatch.error.class") == b"late"]
    counters = store.counters()
    if not loses:
        assert joined == len(replays) and not late and counters.get(("teacher", "late"), 0) == 0
    else:
        # Windows closed once the teacher topic had idled for the timeout; replays for them came too late.
        assert late and counters[("teacher", "late")] == len(late)
        assert joined + len(late) + counters.get(("teacher", "unmatched"), 0) == len(replays)
        assert joined < len(replays)
