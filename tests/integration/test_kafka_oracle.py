"""Random streams through Kafka, consumed while they are produced, against the independent oracle.

The streams of tests/unit/collector/test_semantics_oracle.py (two models with different class
counts, repeated request_ids, out-of-order and straggling records, replays and labels before and far
after their prediction, orphans, audits, carried labels) are written to one-partition topics in
bursts with random pauses while a collector consumes them. Its stored windows (final, and the newest
ones as stored so far) and counters must equal tests/oracle.py, which shares no code with the
engine, and `kdwatch analyze` on JSONL and Parquet (the unit test holds those to the oracle).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from typing import Any

import orjson
import pytest
from kafka import KafkaProducer

from kdwatch.collector.consumer import Collector, CollectorConfig
from kdwatch.storage.sql import SqlStore
from tests.integration.helpers import new_topics, topic_map
from tests.integration.test_live_equivalence import waiting
from tests.oracle import INPUTS, Oracle
from tests.unit.collector.test_semantics_oracle import COMPARED, GRACE_MS, WINDOW_MS, random_stream

IDLE_MS = 4_000


def _produce(kafka: str, topics: dict[str, str], stream: dict[str, list[dict[str, Any]]], rng: random.Random) -> None:
    """Each topic in its stream's order, the three interleaved in random bursts with pauses."""
    producer = KafkaProducer(bootstrap_servers=kafka, acks="all", linger_ms=5, max_in_flight_requests_per_connection=1)
    cursor = dict.fromkeys(INPUTS, 0)
    try:
        while any(cursor[k] < len(stream[k]) for k in INPUTS):
            kind = rng.choice([k for k in INPUTS if cursor[k] < len(stream[k])])
            n = rng.choice([1, 10, 50, 200])
            for event in stream[kind][cursor[kind]:cursor[kind] + n]:
                producer.send(topics[kind], key=event["request_id"].encode(), value=orjson.dumps(event))
            cursor[kind] += n
            producer.flush(timeout=60)
            time.sleep(rng.uniform(0.0, 0.3))
    finally:
        producer.close(timeout=30)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("seed", "retries_only"), [(11, True), (12, True), (13, False)])
def test_random_streams_through_kafka_equal_the_oracle(kafka: str, store: SqlStore, seed: int, retries_only: bool) -> None:
    """Retries only, or ids also reused after their window closed (new requests): the columnar engine all along."""
    stream = random_stream(seed, 800, retries_only)
    oracle = Oracle(WINDOW_MS, GRACE_MS)
    oracle.run(stream)
    topics = new_topics(kafka, partitions=1)
    group = "oracle-" + topics.predictions
    collector = Collector(CollectorConfig(kafka, group_id=group, topics=topics, window_ms=WINDOW_MS, grace_ms=GRACE_MS,
                                          idle_timeout_ms=IDLE_MS, max_poll_records=random.Random(seed).choice([50, 500])),
                          store)
    stop = threading.Event()
    consumer = threading.Thread(target=collector.run, kwargs={"stop": stop}, daemon=True)
    consumer.start()
    _produce(kafka, topic_map(topics), stream, random.Random(seed))
    total = sum(len(stream[k]) for k in INPUTS)
    deadline = time.monotonic() + 120
    while collector.processed < total and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(IDLE_MS / 1000 + 2)  # every input idle: the watermark moves on, the caught-up state is stored
    stop.set()
    consumer.join(60)
    assert collector.processed == total
    meta = store.load_engine(0)[0]
    assert meta is not None

    stored = {tuple(k): state.result(None) for k, (state, _final, _w) in store.windows().items()}
    expected = {key: w.fields() for key, w in oracle.windows.items()}
    assert {k: {f: r[f] for f in COMPARED} for k, r in stored.items()} == expected
    live = Counter(store.counters())
    live.update(waiting(store, partitions=1))
    assert {k: v for k, v in live.items() if v} == {k: v for k, v in oracle.counters.items() if v}
