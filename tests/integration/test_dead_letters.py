"""Poison messages go to <topic>.DLT with their reason; valid traffic is unaffected."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
from kafka import KafkaConsumer, TopicPartition

from kdwatch.collector.consumer import CollectorConfig, kafka_partition
from kdwatch.collector.offline import analyze_files
from kdwatch.generator import TrafficSpec, generate
from kdwatch.loadgen import produce_records
from kdwatch.storage.sql import SqlStore
from tests.integration.helpers import (
    TEST_IDLE_MS,
    differences,
    explain,
    new_topics,
    read_topic,
    run_collector_until,
    stored_results,
    topic_map,
    window_results,
    write_jsonl,
)

TS = 1_795_000_030_000
GOOD = {"request_id": "x", "model": "fraud-distil", "student_version": "s1", "ts": TS, "probs": [0.5, 0.5]}


def _p(**changes: object) -> bytes:
    return orjson.dumps({**GOOD, **changes})


# (kind, value, reason expected in the dead-letter headers)
POISON: list[tuple[str, bytes, str]] = [
    ("prediction", b"{not json", "invalid_json"),
    ("prediction", b"\xff\xfe{}", "invalid_utf8"),
    ("prediction", b"[1, 2]", "not_an_object"),
    ("prediction", orjson.dumps({k: v for k, v in GOOD.items() if k != "model"}), "missing_field"),
    ("prediction", _p(model=5), "wrong_type"),
    ("prediction", _p(probs=[0.5, float("nan")]).replace(b"null", b"NaN"), "invalid_json"),
    ("prediction", _p(probs=[-0.5, 1.5]), "negative_probability"),
    ("prediction", _p(probs=[0.2, 0.2]), "probs_not_normalised"),
    ("prediction", _p(logits=[1.0, 2.0]), "probs_or_logits"),
    ("prediction", _p(ts=1_795_000_030), "timestamp_out_of_range"),  # seconds, not milliseconds: 1970
    ("prediction", _p(ts="1999-12-31T23:59:59Z"), "timestamp_out_of_range"),  # ancient
    ("prediction", _p(ts="yesterday"), "invalid_timestamp"),
    ("prediction", _p(extra=1), "unknown_field"),
    ("prediction", _p(v=2), "unsupported_version"),
    ("prediction", _p(label=7), "label_out_of_range"),
    ("prediction", _p(audit="member"), "missing_field"),
    ("prediction", _p(features={f"f{i}": i for i in range(300)}), "too_many_features"),
    ("prediction", _p(request_id="r" * 300), "string_too_long"),
    ("prediction", _p(latency_ms=-1), "bad_latency"),
    ("prediction", b'{"pad": "' + b"x" * (10 * 1024 * 1024) + b'"}', "too_large"),  # a 10 MiB value
    # A clock a day ahead: valid by the contract, but it would drag the watermark and close every window.
    ("prediction", _p(ts=int(time.time() * 1000) + 86_400_000), "future_timestamp"),
    ("prediction", _p(probs=[0.5, 0.5], features={"f": float("inf")}).replace(b"null", b"Infinity"), "invalid_json"),
    ("teacher", orjson.dumps({"request_id": "x", "model": "m", "ts": TS, "probs": [1.0, 0.0]}), "missing_field"),
    ("label", orjson.dumps({"request_id": "x", "model": "m", "label": -1, "ts": TS}), "label_out_of_range"),
    # Generative students (contract v1, additive): a broken generation, a label on a generative prediction,
    # a generation beside probs, a replay generation without the teacher's top-1.
    ("prediction", _p(probs=None, generation={"tokens": [1, 2], "logprobs": [-0.1]}).replace(b'"probs":null,', b""),
     "bad_generation"),
    ("prediction", _p(probs=None, label=1, generation={"tokens": [1], "logprobs": [-0.1]}).replace(b'"probs":null,', b""),
     "generative_mismatch"),
    ("prediction", _p(generation={"tokens": [1], "logprobs": [-0.1]}), "probs_or_logits"),
    ("teacher", orjson.dumps({"request_id": "x", "model": "m", "teacher_version": "t", "ts": TS,
                              "generation": {"logprobs": [-0.1], "tokens": [1]}}), "bad_generation"),
]


def _dead_letters(kafka: str, topic: str) -> list[tuple[bytes, dict[str, bytes]]]:
    return [(value, headers) for _key, value, headers in read_topic(kafka, topic)]


def _records(kafka: str, topic: str) -> list[Any]:
    """Every record of ``topic`` with its coordinates (partition, offset, timestamp, key, value, headers)."""
    consumer = KafkaConsumer(bootstrap_servers=kafka, enable_auto_commit=False, consumer_timeout_ms=3000,
                             fetch_max_bytes=32 * 1024 * 1024, max_partition_fetch_bytes=16 * 1024 * 1024)
    parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    out = list(consumer)
    consumer.close()
    return out


def test_every_poison_message_is_dead_lettered_with_its_reason(kafka: str, tmp_path: Path) -> None:
    valid = list(generate(TrafficSpec(seed=3, events_per_second=20), 2_000))
    # Interleave: one poison message after every 50 valid records.
    mixed: list[tuple[str, str, bytes]] = []
    for i, record in enumerate(valid):
        mixed.append(record)
        if i % 50 == 0 and i // 50 < len(POISON):
            kind, value, _reason = POISON[i // 50]
            mixed.append((kind, f"poison-{i}", value))
    # Duplicate request ids: a second copy of a prediction, a replay and a label already joined (same key,
    # so the same partition), while their window is still open.
    duplicates = [next(r for r in valid if r[0] == kind) for kind in ("prediction", "teacher", "label")]
    mixed += duplicates
    topics = new_topics(kafka, partitions=2)
    produce_records(kafka, topic_map(topics), mixed, options={"max_request_size": 16 * 1024 * 1024})

    store = SqlStore.from_url(f"sqlite:///{tmp_path / 'k.db'}")
    store.migrate()
    run_collector_until(CollectorConfig(kafka, idle_timeout_ms=TEST_IDLE_MS,
                                        group_id="g-" + topics.predictions, topics=topics), store, len(mixed))

    received = []
    originals = {}
    for topic in (topics.predictions, topics.teacher, topics.labels):
        originals.update({(topic, r.partition, r.offset): r for r in _records(kafka, topic)})
        received += [(topic, r) for r in _records(kafka, topic + ".DLT")]
    reasons = sorted(dict(r.headers)["kdwatch.error.class"].decode() for _t, r in received)
    assert reasons == sorted([reason for _k, _v, reason in POISON] + ["duplicate"] * 3)
    for topic, dead in received:
        headers = dict(dead.headers)
        assert headers["kdwatch.original.topic"].decode() == topic
        original = originals[(topic, int(headers["kdwatch.original.partition"]), int(headers["kdwatch.original.offset"]))]
        # The dead letter is the original record, in the same partition, with its key and its timestamp named.
        assert (dead.key, dead.value, dead.partition) == (original.key, original.value, original.partition)
        assert int(headers["kdwatch.original.timestamp"]) == original.timestamp
        assert headers["kdwatch.error.message"]
        assert dead.value in {v for _k, v, _r in POISON} | {v for _k, _rid, v in duplicates}

    counted = store.counters()
    for kind, _value, reason in POISON:
        assert counted[(kind, reason)] >= 1
    assert {kind for (kind, reason) in counted if reason == "duplicate"} == {"prediction", "teacher", "label"}
    assert sum(c for (_kind, reason), c in counted.items() if reason != "valid") == len(POISON) + len(duplicates)
    # A duplicate passes the contract (counted valid) and is then kept out of the windows (counted duplicate).
    assert sum(c for (_kind, reason), c in counted.items() if reason == "valid") == len(valid) + len(duplicates)

    # The offline truth of the same records (the future timestamp aside: only a live collector has a clock),
    # joined per partition as the topics hold them: rejected and duplicate counts included.
    future = next(value for _kind, value, reason in POISON if reason == "future_timestamp")
    offline = [r for r in mixed if r[2] != future]
    paths = write_jsonl(offline, tmp_path / "mixed")
    windows, _counters = analyze_files(paths["prediction"], paths["teacher"], paths["label"], partitions=2,
                                       partitioner=kafka_partition)
    expected = window_results(windows, 60_000)
    stored = stored_results(store)
    assert sum(r["n_rejected"] for r in stored.values()) > 0 and sum(r["n_duplicate"] for r in stored.values()) == 3
    diffs = differences(stored, expected)
    assert not diffs, explain(diffs)
    store.close()
