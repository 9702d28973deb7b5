"""The collector against a real Kafka broker and both databases."""

from __future__ import annotations

from pathlib import Path

from kdwatch.collector.consumer import CollectorConfig
from kdwatch.collector.offline import load_reference
from kdwatch.generator import TrafficSpec, generate
from kdwatch.loadgen import produce_records
from kdwatch.storage.sql import SqlStore
from tests.integration.helpers import (
    TEST_IDLE_MS,
    differences,
    explain,
    new_topics,
    offline_results,
    run_collector_until,
    stored_results,
    topic_map,
    write_jsonl,
)


def test_windows_stored_from_kafka_equal_the_offline_analysis(kafka: str, store: SqlStore, tmp_path: Path) -> None:
    records = list(generate(TrafficSpec(seed=7, events_per_second=20, audit_rate=0.1), 3_000))
    reference_records = list(generate(TrafficSpec(seed=8), 2_000))
    paths = write_jsonl(records, tmp_path / "events")
    refs = load_reference(write_jsonl(reference_records, tmp_path / "ref")["prediction"])
    topics = new_topics(kafka, partitions=3)
    produce_records(kafka, topic_map(topics), records)

    run_collector_until(CollectorConfig(kafka, idle_timeout_ms=TEST_IDLE_MS,
                                        group_id="g-" + topics.predictions, topics=topics), store, len(records),
                        references=refs)

    stored = stored_results(store, refs)
    expected = offline_results(paths, refs)
    assert sum(r["n"] for r in stored.values()) == 3_000
    assert sum(r["n_audit"] for r in stored.values()) == sum(1 for _k, rid, _v in records if rid.startswith("audit-"))
    assert all(r["mia"] is not None and r["mia"]["auc"] is not None for r in stored.values() if r["n_audit"] > 10)
    assert sum(r["n_joined"] for r in stored.values()) == sum(1 for k, _, _ in records if k == "teacher")
    diffs = differences(stored, expected)
    assert not diffs, explain(diffs)
