"""Every PromQL expression of every Grafana panel returns data from a real Prometheus scraping a live
kdwatch fed through the real broker."""

from __future__ import annotations

import heapq
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry

from kdwatch.api import ApiSettings, create_app
from kdwatch.collector.consumer import CollectorConfig
from kdwatch.collector.offline import load_reference
from kdwatch.demo import LocalServer
from kdwatch.devkafka import free_port
from kdwatch.generator import GenerativeSpec, TrafficSpec, generate, generate_generative
from kdwatch.lag import kafka_readiness, lag_source
from kdwatch.loadgen import produce_records
from kdwatch.slo.config import load_slo_file
from kdwatch.slo.dispatch import Dispatcher
from kdwatch.slo.live import LiveConfig, LiveEngine
from kdwatch.storage.slo_store import SloSqlStore
from kdwatch.storage.sql import SqlStore
from tests.integration.helpers import TEST_IDLE_MS, new_topics, run_collector_until, topic_map, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def api_url(kafka: str, tmp_path: Path) -> Iterator[str]:
    store = SqlStore.from_url(f"sqlite:///{tmp_path / 'k.db'}")
    store.migrate()
    # A generative student beside the classifier, interleaved in arrival order: the token-level panels need its windows.
    records = list(heapq.merge(generate(TrafficSpec(events_per_second=2, audit_rate=0.2, teacher_rate=0.3), 3_000),
                               generate_generative(GenerativeSpec(events_per_second=0.5, teacher_rate=0.5), 400),
                               key=lambda record: orjson.loads(record[2])["ts"]))
    records += [("prediction", "poison-1", b"{not json"), ("label", "poison-2", b'{"request_id": "x"}')]
    refs = load_reference(write_jsonl(list(generate(TrafficSpec(seed=4), 1_000)), tmp_path / "ref")["prediction"])
    store.put_reference("fraud-distil", refs["fraud-distil"])
    slo_store = SloSqlStore(store.engine)
    slo_store.put_slo_document(load_slo_file(ROOT / "examples" / "slo.yaml").model_dump(mode="json", exclude_none=True), 0)
    topics = new_topics(kafka, partitions=2)
    produce_records(kafka, topic_map(topics), records)
    run_collector_until(CollectorConfig(kafka, idle_timeout_ms=TEST_IDLE_MS,
                                        group_id="g-" + topics.predictions, topics=topics), store, len(records),
                        references=store.references())
    client = httpx.Client()
    engine = LiveEngine(load_slo_file(ROOT / "examples" / "slo.yaml"), store, slo_store, Dispatcher(slo_store, {}, client),
                        LiveConfig(), client=client)
    engine.run_once()
    engine.close()

    app = create_app(store, ApiSettings(), CollectorRegistry(), readiness=kafka_readiness(kafka), lag=lag_source(kafka, store))
    with LocalServer(app) as server:
        yield f"127.0.0.1:{server.port}"
    store.close()


@pytest.fixture
def prometheus(api_url: str, tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary is not None, "installed by `make setup` (Debian package prometheus)"
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n"
                      f"  - job_name: kdwatch\n    static_configs:\n      - targets: ['{api_url}']\n")
    port = free_port()
    with (tmp_path / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client() as client:
            deadline = time.monotonic() + 60
            samples = 0.0
            while time.monotonic() < deadline:
                try:
                    result = client.get(url + "/api/v1/query", params={"query": 'count_over_time(up{job="kdwatch"}[1m])'}).json()
                    values = result["data"]["result"]
                    samples = float(values[0]["value"][1]) if values else 0.0
                    if samples >= 5:
                        break
                except (httpx.HTTPError, KeyError, ValueError):
                    pass  # not up yet
                time.sleep(0.5)
            assert samples >= 5, (tmp_path / "prometheus.log").read_text()[-2000:]
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_every_panel_query_returns_data(prometheus: str) -> None:
    queries = []
    for path in sorted((ROOT / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        assert dashboard["schemaVersion"] >= 36 and dashboard["uid"].startswith("kdwatch-")
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):  # a row has none
                queries.append((path.name, panel["title"], target["expr"].replace("$model", ".*")))
    assert len(queries) >= 20
    empty = []
    with httpx.Client() as client:
        up = client.get(prometheus + "/api/v1/query", params={"query": 'up{job="kdwatch"}'}).json()
        assert up["data"]["result"][0]["value"][1] == "1"
        for name, title, expr in queries:
            body = client.get(prometheus + "/api/v1/query", params={"query": expr}).json()
            assert body["status"] == "success", (name, title, expr, body)
            if not body["data"]["result"]:
                empty.append((name, title, expr))
    assert empty == []
