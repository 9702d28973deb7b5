"""/metrics and /readyz answer at once while Kafka is down or a topic is gone (the lag refreshes in the background)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from kdwatch.api import ApiSettings, create_app
from kdwatch.collector.consumer import CollectorConfig
from kdwatch.collector.records import Changes
from kdwatch.devkafka import DevKafka
from kdwatch.generator import TrafficSpec, generate
from kdwatch.lag import LagSource, kafka_readiness
from kdwatch.loadgen import produce_records
from kdwatch.storage.sql import SqlStore
from tests.integration.helpers import TEST_IDLE_MS, new_topics, run_collector_until, topic_map

SCRAPE_BUDGET_S = 1.0


def _metric(text: str, name: str) -> list[float]:
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{") or line.startswith(name + " ")]


def _timed(client: TestClient, path: str) -> tuple[float, str, int]:
    began = time.monotonic()
    response = client.get(path)
    return time.monotonic() - began, response.text, response.status_code


def _wait(condition, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_scrapes_answer_within_a_second_while_the_broker_is_down_and_serve_the_last_lag(tmp_path: Path, store: SqlStore) -> None:
    broker = DevKafka(tmp_path / "kafka")
    bootstrap = broker.start().bootstrap
    try:
        topics = new_topics(bootstrap, partitions=2)
        records = list(generate(TrafficSpec(seed=3), 300))
        produce_records(bootstrap, topic_map(topics), records)
        run_collector_until(CollectorConfig(bootstrap, idle_timeout_ms=TEST_IDLE_MS, group_id="m-" + topics.predictions,
                                            topics=topics), store, len(records))
        produce_records(bootstrap, topic_map(topics), records[:50])  # 50 more: a lag of 50 records to report
        lag = LagSource(bootstrap, store, interval_s=0.5, timeout_ms=2_000).start()
        app = create_app(store, ApiSettings(), CollectorRegistry(), readiness=kafka_readiness(bootstrap, timeout_s=2.0), lag=lag)
        with TestClient(app) as client:
            _wait(lambda: lag.snapshot().last_success_s is not None and sum(lag().values()) == 50, 30, "a first lag refresh")
            _seconds, text, _status = _timed(client, "/metrics")
            assert sum(_metric(text, "kdwatch_consumer_lag")) == 50
            seen_at = _metric(text, "kdwatch_consumer_lag_last_success_timestamp_seconds")[0]

            # The broker goes down for 15 s (then comes back on the same ports and data).
            restart = threading.Thread(target=broker.restart, kwargs={"down_s": 15.0}, daemon=True)
            restart.start()
            _wait(lambda: broker.info() is None, 60, "the broker to stop")
            failures_before = lag.snapshot().failures
            took = []
            for _ in range(6):
                seconds, text, status = _timed(client, "/metrics")
                took.append(seconds)
                assert status == 200
                assert sum(_metric(text, "kdwatch_consumer_lag")) == 50  # the last known values, still served
                time.sleep(0.5)
            assert max(took) < SCRAPE_BUDGET_S, took
            _wait(lambda: lag.snapshot().failures > failures_before, 30, "a failed refresh to be counted")
            _seconds, text, _status = _timed(client, "/metrics")
            assert _metric(text, "kdwatch_consumer_lag_refresh_failures_total")[0] > failures_before
            assert _metric(text, "kdwatch_consumer_lag_last_success_timestamp_seconds")[0] <= time.time() - 0.5
            seconds, _text, status = _timed(client, "/readyz")
            assert status == 503 and seconds < 2.0 + SCRAPE_BUDGET_S, seconds
            seconds, _text, status = _timed(client, "/healthz")
            assert status == 200 and seconds < 0.1

            restart.join(120)
            _wait(lambda: (lag.snapshot().last_success_s or 0) > seen_at + 1, 60, "a refresh after the broker came back")
            _seconds, _text, status = _timed(client, "/readyz")
            assert status == 200
    finally:
        broker.stop()


def test_scrapes_answer_within_a_second_when_a_stored_topic_no_longer_exists(kafka: str, store: SqlStore) -> None:
    # Offsets stored for a topic the broker does not have (deleted after kdwatch consumed it).
    store.commit_batch("gone-group", 0, 60_000, Changes(), {"kdwatch.gone": (None, 10)})
    lag = LagSource(kafka, store, interval_s=0.5, timeout_ms=2_000).start()
    app = create_app(store, ApiSettings(), CollectorRegistry(), lag=lag)
    with TestClient(app) as client:
        took = []
        for _ in range(4):
            seconds, _text, status = _timed(client, "/metrics")
            assert status == 200
            took.append(seconds)
            time.sleep(0.5)
        assert max(took) < SCRAPE_BUDGET_S, took
        _wait(lambda: lag.snapshot().failures > 0, 30, "the missing topic to be reported as a failed refresh")
        _seconds, text, _status = _timed(client, "/metrics")
        assert _metric(text, "kdwatch_consumer_lag_refresh_failures_total")[0] > 0
