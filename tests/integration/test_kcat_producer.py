"""Events produced by kcat (librdkafka: a producer that is not ours) are consumed and joined."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from kdwatch.collector.consumer import CollectorConfig
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
    write_jsonl,
)


def _kcat(kafka: str, topic: str, records: list[tuple[str, str, bytes]]) -> None:
    kcat = shutil.which("kcat")
    assert kcat is not None, "kcat is installed by `make setup` (Debian package kcat)"
    lines = b"".join(rid.encode() + b"\t" + value + b"\n" for _kind, rid, value in records)
    # murmur2_random is librdkafka's Java-compatible partitioner: the contract's partitioning.
    subprocess.run([kcat, "-P", "-b", kafka, "-t", topic, "-K", "\t", "-X", "topic.partitioner=murmur2_random"],
                   input=lines, check=True, timeout=120)


def test_kcat_predictions_join_kafka_python_replays_and_labels(kafka: str, tmp_path: Path) -> None:
    records = list(generate(TrafficSpec(seed=5, events_per_second=20), 2_000))
    topics = new_topics(kafka, partitions=3)
    _kcat(kafka, topics.predictions, [r for r in records if r[0] == "prediction"])
    _kcat(kafka, topics.labels, [r for r in records if r[0] == "label"])
    produce_records(kafka, {"teacher": topics.teacher}, [r for r in records if r[0] == "teacher"])

    store = SqlStore.from_url(f"sqlite:///{tmp_path / 'k.db'}")
    store.migrate()
    run_collector_until(CollectorConfig(kafka, idle_timeout_ms=TEST_IDLE_MS,
                                        group_id="g-" + topics.predictions, topics=topics), store, len(records))
    stored = stored_results(store)
    store.close()

    expected = offline_results(write_jsonl(records, tmp_path / "events"))
    n_teacher = sum(1 for r in records if r[0] == "teacher")
    assert sum(r["n_joined"] for r in stored.values()) == n_teacher  # the two partitioners agreed on every key
    diffs = differences(stored, expected)
    assert not diffs, explain(diffs)
