"""The collector's own metrics (kdwatch.collector.telemetry) agree with what it stored and dead-lettered."""

from __future__ import annotations

import threading
import time
from collections import Counter

from prometheus_client import CollectorRegistry

from kdwatch.collector.consumer import DLT_SUFFIX, Collector, CollectorConfig
from kdwatch.collector.telemetry import CollectorMetrics
from kdwatch.generator import TrafficSpec, generate
from kdwatch.loadgen import produce_records
from kdwatch.storage.sql import SqlStore
from tests.integration.helpers import TEST_IDLE_MS, new_topics, read_topic, topic_map


def test_collector_self_metrics_match_the_stored_counters_and_the_dead_letter_topics(kafka: str, store: SqlStore) -> None:
    topics = new_topics(kafka, partitions=2)
    records = list(generate(TrafficSpec(seed=5, events_per_second=20), 3_000))
    records[100:100] = [("prediction", "bad-1", b"{not json"), ("label", "bad-2", b"[1]"), ("teacher", "bad-3", b"{}")]
    records += records[200:230]  # duplicates, as at-least-once producers send
    produce_records(kafka, topic_map(topics), records)
    registry = CollectorRegistry()
    collector = Collector(CollectorConfig(kafka, group_id="selfm-" + topics.predictions, topics=topics,
                                          idle_timeout_ms=TEST_IDLE_MS), store, metrics=CollectorMetrics(registry))
    began = time.time()
    stop = threading.Event()
    thread = threading.Thread(target=collector.run, args=(stop,), kwargs={"idle_exit_s": 6.0}, daemon=True)
    thread.start()
    thread.join(180)
    assert not thread.is_alive() and collector.processed == len(records)

    def value(name: str, **labels: str) -> float:
        sample = registry.get_sample_value(name, labels)
        assert sample is not None, f"{name}{labels} not exported"
        return sample

    per_topic = Counter(topic_map(topics)[kind] for kind, _key, _value in records)
    for topic, n in per_topic.items():
        assert value("kdwatch_collector_records_total", topic=topic) == n
    for (kind, outcome), n in store.counters().items():
        assert value("kdwatch_collector_events_total", kind=kind, outcome=outcome) == n, (kind, outcome)
    dead: Counter[tuple[str, str]] = Counter()
    for topic in per_topic:
        for _key, _value, headers in read_topic(kafka, topic + DLT_SUFFIX):
            dead[(topic, headers["kdwatch.error.class"].decode())] += 1
    assert dead and sum(dead.values()) >= 3 + 30
    for (topic, reason), n in dead.items():
        assert value("kdwatch_collector_dead_letters_total", topic=topic, reason=reason) == n, (topic, reason)
    assert began <= value("kdwatch_collector_last_commit_timestamp_seconds") <= time.time()
    assert value("kdwatch_collector_batch_duration_seconds_count") > 0
    assert value("kdwatch_collector_windows_closed_total") == len([w for w in store.windows().values() if w[1]])
    assert value("kdwatch_collector_partitions_owned") == 2
    for p, unit in collector.units.items():
        assert unit.watermark is not None
        assert value("kdwatch_collector_watermark_timestamp_seconds", partition=str(p)) == unit.watermark / 1000
        assert value("kdwatch_collector_join_buffer_entries", partition=str(p)) == unit.buffered
        for kind, observed in unit.observed.items():
            assert value("kdwatch_collector_input_event_time_seconds", partition=str(p), input=kind) == observed / 1000
            assert value("kdwatch_collector_queued_records", partition=str(p), input=kind) == 0
