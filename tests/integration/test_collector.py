"""The collector against a real Kafka broker and both databases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from kdwatch.collector.consumer import CollectorConfig
from kdwatch.collector.offline import load_reference
from kdwatch.generator import GenerativeSpec, TrafficSpec, generate, generate_generative
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


def through_kafka_and_offline(kafka: str, store: SqlStore, tmp_path: Path, records: list[tuple[str, str, bytes]],
                              reference_records: list[tuple[str, str, bytes]]) -> tuple[dict[Any, Any], dict[Any, Any]]:
    """The windows a collector stores from ``records`` produced to Kafka, and `kdwatch analyze`'s on the same events."""
    paths = write_jsonl(records, tmp_path / "events")
    refs = load_reference(write_jsonl(reference_records, tmp_path / "ref")["prediction"])
    topics = new_topics(kafka, partitions=3)
    produce_records(kafka, topic_map(topics), records)
    run_collector_until(CollectorConfig(kafka, idle_timeout_ms=TEST_IDLE_MS, group_id="g-" + topics.predictions,
                                        topics=topics), store, len(records), references=refs)
    return stored_results(store, refs), offline_results(paths, refs)


def test_windows_stored_from_kafka_equal_the_offline_analysis(kafka: str, store: SqlStore, tmp_path: Path) -> None:
    records = list(generate(TrafficSpec(seed=7, events_per_second=20, audit_rate=0.1), 3_000))
    reference_records = list(generate(TrafficSpec(seed=8), 2_000))
    stored, expected = through_kafka_and_offline(kafka, store, tmp_path, records, reference_records)
    assert sum(r["n"] for r in stored.values()) == 3_000
    assert sum(r["n_audit"] for r in stored.values()) == sum(1 for _k, rid, _v in records if rid.startswith("audit-"))
    assert all(r["mia"] is not None and r["mia"]["auc"] is not None for r in stored.values() if r["n_audit"] > 10)
    assert sum(r["n_joined"] for r in stored.values()) == sum(1 for k, _, _ in records if k == "teacher")
    diffs = differences(stored, expected)
    assert not diffs, explain(diffs)


def test_generative_windows_stored_from_kafka_equal_the_offline_analysis(kafka: str, store: SqlStore, tmp_path: Path) -> None:
    """A language-model student's traffic (token sequences, teacher-forced replays, audits, a few poisoned and
    mismatched records): the stored windows equal `kdwatch analyze` on the same events, field by field."""
    records = list(generate_generative(GenerativeSpec(seed=3, events_per_second=10, audit_rate=0.1, teacher_rate=0.4), 1_500))
    reference_records = list(generate_generative(GenerativeSpec(seed=4), 800))
    replayed = {rid for kind, rid, _v in records if kind == "teacher"}
    lonely = next(orjson.loads(v) for k, rid, v in records if k == "prediction" and rid not in replayed and "audit" not in rid)
    length = len(lonely["generation"]["tokens"])
    short = {"request_id": lonely["request_id"], "model": "support-chat", "teacher_version": "t1", "ts": lonely["ts"] + 1_000,
             "generation": {"logprobs": [-0.5] * (length - 1), "top1": [7] * (length - 1)}}
    label = {"request_id": lonely["request_id"], "model": "support-chat", "label": 1, "ts": lonely["ts"] + 1_500}
    records += [("teacher", short["request_id"], orjson.dumps(short)), ("label", label["request_id"], orjson.dumps(label))]
    stored, expected = through_kafka_and_offline(kafka, store, tmp_path, records, reference_records)
    assert sum(r["n"] for r in stored.values()) == 1_500
    assert sum(r["n_tokens"] for r in stored.values()) > 1_500 * 0.4 * 50
    assert all(r["token_agreement"] is not None and r["psi"]["_length"] is not None for r in stored.values() if r["n_joined"] > 20)
    assert all(r["agreement"] is None and r["ece"] is None for r in stored.values())
    assert store.counters()[("label", "generative_mismatch")] == 1
    assert store.counters()[("teacher", "generation_length_mismatch")] == 1
    diffs = differences(stored, expected)
    assert not diffs, explain(diffs)


def test_a_partition_stored_by_the_record_joiner_is_refused_naming_the_way_out(kafka: str, store: SqlStore) -> None:
    """Open state of the per-record engine of development builds cannot be taken over: the collector stops at once
    with an error naming the partition and what to do, instead of losing or double-counting it."""
    import pytest

    from kdwatch.collector.consumer import Collector
    from kdwatch.collector.ingest import merge_key
    from kdwatch.errors import ConfigError
    from tests.record_joiner.ingest import ingest
    from tests.record_joiner.join import PartitionJoiner

    topics = new_topics(kafka, partitions=1)
    config = CollectorConfig(kafka, idle_timeout_ms=TEST_IDLE_MS, group_id="g-" + topics.predictions, topics=topics)
    joiner = PartitionJoiner(config.window_ms, config.grace_ms)
    _kind, _rid, value = next(r for r in generate(TrafficSpec(seed=2), 5) if r[0] == "prediction")
    ingest(joiner, "prediction", value, parsed=merge_key(value)[1])
    store.commit_batch(config.group_id, 0, config.window_ms, joiner.end_batch({}), {topics.predictions: (None, 1)})
    with pytest.raises(ConfigError, match=r"partition 0 of group .* holds open state of the record joiner"):
        Collector(config, store).run(idle_exit_s=30)


def test_a_backlog_over_the_queue_limit_is_consumed_through_pauses_and_resumes(kafka: str, store: SqlStore,
                                                                               tmp_path: Path) -> None:
    """Partitions paused when their queue fills (empty replay and label topics hold the merge for the idle timeout) come back.

    kafka-python 3.0 left a resumed partition unfetched for good (collector.consumer._resume); the stall watch
    would reopen the consumer only after 30 s, so finishing well inside that proves the resume itself works.
    """
    import time

    records = list(generate(TrafficSpec(seed=21, events_per_second=50, teacher_rate=0.0, label_rate=0.0), 12_000))
    topics = new_topics(kafka, partitions=3)
    produce_records(kafka, topic_map(topics), records)
    began = time.monotonic()
    run_collector_until(CollectorConfig(kafka, idle_timeout_ms=1_000, group_id="g-" + topics.predictions, topics=topics,
                                        max_queued=500, max_poll_records=400), store, len(records), timeout_s=25)
    assert time.monotonic() - began < 25
    stored, expected = stored_results(store), offline_results(write_jsonl(records, tmp_path / "events"))
    diffs = differences(stored, expected)
    assert not diffs, explain(diffs)
