"""PostgreSQL stopped for 30 s mid-stream: the collector pauses and resumes, /readyz says so, nothing lost."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import psycopg
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from kdwatch.api import ApiSettings, create_app
from kdwatch.generator import TrafficSpec, generate
from kdwatch.loadgen import produce_records
from kdwatch.storage.sql import SqlStore
from tests.conftest import PostgresCluster
from tests.integration.helpers import (
    collector_process,
    differences,
    explain,
    new_topics,
    offline_results,
    stored_n,
    stored_results,
    topic_map,
    write_jsonl,
)

OUTAGE_S = 30


def test_a_30_second_database_outage_pauses_the_collector_and_loses_nothing(kafka: str, postgres_cluster: PostgresCluster,
                                                                           tmp_path: Path) -> None:
    name = f"outage_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_cluster.url.replace("postgresql+psycopg", "postgresql") + "/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{postgres_cluster.url}/{name}"
    store = SqlStore.from_url(url)
    store.migrate()
    total = 40_000
    records = list(generate(TrafficSpec(seed=23, events_per_second=40), total))
    topics = new_topics(kafka, partitions=2)
    produce_records(kafka, topic_map(topics), records)
    log = tmp_path / "collector.log"
    proc = collector_process(kafka, url, topics, "outage-" + topics.predictions, log, idle_exit=15.0, max_poll_records=300)
    try:
        deadline = time.monotonic() + 60
        while stored_n(store) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        before = stored_n(store)
        postgres_cluster.stop()
        with TestClient(create_app(store, ApiSettings(), CollectorRegistry())) as api:
            down = api.get("/readyz")
            time.sleep(OUTAGE_S)
            assert proc.poll() is None, "the collector must survive the outage: " + log.read_text()[-2000:]
            postgres_cluster.start()
            up = api.get("/readyz")
        assert down.status_code == 503 and down.json()["checks"]["database"].startswith("unavailable")
        assert up.status_code == 200
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        postgres_cluster.start()  # a no-op when it already runs
    assert 0 < before < total
    assert "database unavailable" in log.read_text()
    assert stored_n(store) == total
    diffs = differences(stored_results(store), offline_results(write_jsonl(records, tmp_path / "events")))
    assert not diffs, explain(diffs)
    store.close()
