"""The producer SDK against the real broker: strict and production modes, overflow, flush at exit."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from kdwatch.collector.contract import decode_label, decode_prediction
from kdwatch.errors import ContractError
from kdwatch.producer import PredictionLogger
from tests.integration.helpers import new_topics, read_topic

ROOT = Path(__file__).resolve().parents[2]
TS = 1_795_000_030_000


def test_strict_mode_raises_on_an_invalid_record_and_queues_nothing(kafka: str) -> None:
    topics = new_topics(kafka, partitions=1)
    with PredictionLogger(kafka, "m", "s1", predictions_topic=topics.predictions, strict=True) as logger:
        with pytest.raises(ContractError) as caught:
            logger.log("r1", probs=[0.7, 0.7])
        assert caught.value.reason == "probs_not_normalised"
        with pytest.raises(ContractError, match="exactly one of probs, logits or generation"):
            logger.log("r2")
        assert logger.stats.queued == 0


def test_production_mode_drops_invalid_records_with_a_log_line_and_sends_the_rest(
        kafka: str, caplog: pytest.LogCaptureFixture) -> None:
    topics = new_topics(kafka, partitions=2)
    with caplog.at_level(logging.WARNING, logger="kdwatch.producer"):
        logger = PredictionLogger(kafka, "m", "s1", predictions_topic=topics.predictions, labels_topic=topics.labels)
        accepted = [logger.log(f"r{i}", probs=np.array([0.25, 0.75]), features={"x": float(i), "c": "eu"}, latency_ms=2.5,
                               ts_ms=TS + i) for i in range(200)]
        assert logger.log("bad", probs=[0.5, float("nan")], ts_ms=TS) is False
        assert logger.log("bad2", logits=[1.0, 2.0], features={"_x": 1.0}, ts_ms=TS) is False
        assert all(logger.log_label(f"r{i}", i % 2, ts_ms=TS + 1_000 + i) for i in range(50))
        assert logger.log_audit("a1", member=True, label=1, logits=[0.1, 2.0], ts_ms=TS)
        assert logger.flush(timeout=30)
        logger.close()
    assert all(accepted)
    assert (logger.stats.invalid, logger.stats.queued, logger.stats.sent, logger.stats.failed) == (2, 251, 251, 0)
    assert "not_finite" in caplog.text and "bad_feature_name" in caplog.text
    predictions = [decode_prediction(v) for _k, v, _h in read_topic(kafka, topics.predictions)]
    assert sorted(p.request_id for p in predictions) == sorted([f"r{i}" for i in range(200)] + ["a1"])
    assert next(p for p in predictions if p.request_id == "r7").features == {"x": 7.0, "c": "eu"}
    assert next(p for p in predictions if p.request_id == "a1").audit == "member"
    labels = [decode_label(v) for _k, v, _h in read_topic(kafka, topics.labels)]
    assert len(labels) == 50 and {k for k, _v, _h in read_topic(kafka, topics.labels)} == {f"r{i}".encode() for i in range(50)}


def test_a_full_queue_drops_the_oldest_and_never_blocks_the_caller() -> None:
    # Nothing listens on port 1: the sender cannot connect, so the queue only fills.
    logger = PredictionLogger("127.0.0.1:1", "m", "s1", queue_size=100)
    try:
        assert all(logger.log(f"r{i}", probs=[0.5, 0.5], ts_ms=TS) for i in range(1_000))
        assert (logger.stats.queued, logger.stats.overflow, logger.stats.sent) == (1_000, 900, 0)
        assert [key for _kind, key, _r in logger._queue] == [f"r{i}" for i in range(900, 1_000)]  # the newest kept
    finally:
        logger.close(timeout=2)


def test_records_are_flushed_when_the_process_exits_without_close(kafka: str) -> None:
    topics = new_topics(kafka, partitions=1)
    script = textwrap.dedent(f"""
        from kdwatch.producer import PredictionLogger
        logger = PredictionLogger({kafka!r}, "m", "s1", predictions_topic={topics.predictions!r})
        for i in range(500):
            logger.log(f"r{{i}}", logits=[0.0, 1.0, 2.0], ts_ms={TS} + i)
        # no close(): the atexit hook must send them
    """)
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=60)
    assert len(read_topic(kafka, topics.predictions)) == 500
