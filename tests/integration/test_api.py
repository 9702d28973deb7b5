"""The REST API over a real database (SQLite and PostgreSQL), through FastAPI's test client."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from kdwatch.analyzer.window import WindowState
from kdwatch.api import ApiSettings, create_app
from kdwatch.collector.records import Changes, WindowKey
from kdwatch.generator import TrafficSpec, generate
from kdwatch.storage.sql import SqlStore

KEY = "k" * 32
AUTH = {"Authorization": f"Bearer {KEY}"}
MIN = 60_000
T0 = 1_795_000_020_000 - 1_795_000_020_000 % 3_600_000


def seed(store: SqlStore, minutes: int = 180) -> None:
    rng = np.random.default_rng(0)
    for partition in (0, 1):
        changes = Changes()
        for i in range(minutes):
            state = WindowState(n=100)
            state.fidelity.n_joined = 10
            state.fidelity.n_agree = int(rng.integers(8, 11))
            changes.closed[WindowKey("m", "s1", T0 + i * MIN)] = state
        store.commit_batch("g", partition, MIN, changes, {})


@pytest.fixture
def client(store: SqlStore) -> Iterator[TestClient]:
    app = create_app(store, ApiSettings(api_key=KEY, max_body_bytes=1_000_000), CollectorRegistry())
    with TestClient(app) as test_client:
        yield test_client


def test_windows_roll_up_by_merging_state_not_averaging(store: SqlStore, client: TestClient) -> None:
    seed(store)
    minute = client.get("/v1/models/m/windows", params={"step": "1m"}).json()["windows"]
    hourly = client.get("/v1/models/m/windows", params={"step": "1h"}).json()["windows"]
    assert len(minute) == 180 and len(hourly) == 3
    assert sum(w["n"] for w in hourly) == sum(w["n"] for w in minute) == 180 * 200
    first_hour = minute[:60]
    agree = sum(round(w["agreement"] * w["n_joined"]) for w in first_hour)
    assert hourly[0]["agreement"] == agree / sum(w["n_joined"] for w in first_hour)
    assert hourly[0]["windows"] == 60 and hourly[0]["final"] is True
    ranged = client.get("/v1/models/m/windows", params={"step": "1h", "from": str(T0 + 3_600_000),
                                                        "to": "2026-11-18T13:00:00Z"}).json()["windows"]
    assert [w["window_start"] for w in ranged] == ["2026-11-18T12:00:00Z"]


def test_windows_are_gzipped_for_clients_that_ask_and_plain_for_the_rest(store: SqlStore, client: TestClient) -> None:
    seed(store, 60)
    plain = client.get("/v1/models/m/windows", params={"step": "5m"}, headers={"accept-encoding": "identity"})
    packed = client.get("/v1/models/m/windows", params={"step": "5m"}, headers={"accept-encoding": "gzip"})
    assert "content-encoding" not in plain.headers and packed.headers["content-encoding"] == "gzip"
    assert plain.headers["vary"] == packed.headers["vary"] == "accept-encoding"
    assert int(packed.headers["content-length"]) < len(plain.content) / 4
    assert packed.json() == plain.json() and len(plain.json()["windows"]) == 12  # httpx decompresses
    cached = client.get("/v1/models/m/windows", params={"step": "5m"}, headers={"accept-encoding": "gzip, deflate"})
    assert cached.headers["content-encoding"] == "gzip" and cached.json() == plain.json()


def test_windows_export_as_csv_and_parquet(store: SqlStore, client: TestClient) -> None:
    seed(store, 60)
    csv = client.get("/v1/models/m/windows", params={"step": "5m", "format": "csv"})
    assert csv.headers["content-type"].startswith("text/csv")
    assert len(pd.read_csv(io.StringIO(csv.text))) == 12
    parquet = client.get("/v1/models/m/windows", params={"step": "5m", "format": "parquet"})
    assert pd.read_parquet(io.BytesIO(parquet.content))["n"].sum() == 60 * 200


@pytest.mark.parametrize(("path", "params", "status"), [
    ("/v1/models/nope/windows", {}, 404),
    ("/v1/models/m/windows", {"step": "2m"}, 422),
    ("/v1/models/m/windows", {"from": "yesterday"}, 422),
    ("/v1/models/m/reference", {}, 404),
    ("/v1/slos/nope", {}, 404),
])
def test_bad_requests_get_a_4xx_with_a_json_body(store: SqlStore, client: TestClient, path: str, params: dict[str, str],
                                                 status: int) -> None:
    seed(store, 5)
    response = client.get(path, params=params)
    assert response.status_code == status
    assert response.json()["error"] and "detail" in response.json()


def test_every_write_route_needs_the_key(client: TestClient) -> None:
    # Every route the app serves, from its OpenAPI document (routers included in the app are listed there).
    paths = client.get("/openapi.json").json()["paths"]
    writes = [(method.upper(), path) for path, operations in paths.items()
              for method in operations if method.upper() in {"POST", "PUT", "PATCH", "DELETE"}]
    assert len(writes) >= 5
    for method, path in writes:
        url = path.replace("{model}", "m").replace("{name}", "x").replace("{silence_id}", "s")
        for headers in ({}, {"Authorization": "Bearer wrong-key-wrong-key-wrong"}, {"Authorization": KEY}):
            response = client.request(method, url, headers=headers, json={})
            assert response.status_code == 401, (method, path, headers, response.status_code)
            assert KEY not in response.text


def test_writes_are_refused_when_no_key_is_configured(store: SqlStore) -> None:
    with TestClient(create_app(store, ApiSettings(api_key=None), CollectorRegistry())) as client:
        assert client.post("/v1/silences", json={}, headers=AUTH).status_code == 403


def test_reference_upload_and_inspect(client: TestClient) -> None:
    body = b"\n".join(v for k, _r, v in generate(TrafficSpec(model="m"), 500) if k == "prediction")
    put = client.put("/v1/models/m/reference", content=body, headers=AUTH)
    assert put.status_code == 200 and put.json()["predictions"] == 500
    got = client.get("/v1/models/m/reference").json()
    assert got["fingerprint"] == put.json()["fingerprint"]
    assert got["features"]["f0"]["kind"] == "numeric" and got["features"]["_predicted_class"]["kind"] == "categorical"
    bad = client.put("/v1/models/m/reference", content=b'{"request_id": 1}', headers=AUTH)
    assert bad.status_code == 422 and "line 1" in bad.json()["detail"]


def test_slos_are_validated_stored_evaluated_and_deleted(client: TestClient) -> None:
    bad = client.put("/v1/slos/a", json={"model": "m", "objective": 2, "sli": {"events": {"metric": "agreement"}}}, headers=AUTH)
    assert bad.status_code == 422 and bad.json()["detail"]["field"] == "slos[0].objective"
    ok = client.put("/v1/slos/a", json={"model": "m", "objective": 0.99, "sli": {"events": {"metric": "agreement"}}}, headers=AUTH)
    assert ok.status_code == 200 and ok.json()["name"] == "a"
    assert [s["name"] for s in client.get("/v1/slos").json()["slos"]] == ["a"]
    status = client.get("/v1/slos/a").json()
    assert status["status"] == "ok" and {w["tier"] for w in status["windows"]} == {"1h/5m", "6h/30m", "1d/2h", "3d/6h"}
    assert client.delete("/v1/slos/a", headers=AUTH).status_code == 204
    assert client.get("/v1/slos").json()["slos"] == []


def test_silences_are_created_listed_and_expired(client: TestClient) -> None:
    created = client.post("/v1/silences", headers=AUTH, json={
        "matchers": {"slo": "a"}, "ends_at": "2100-01-01T00:00:00Z", "created_by": "oncall", "comment": "maintenance"})
    assert created.status_code == 201
    silence_id = created.json()["id"]
    assert [s["id"] for s in client.get("/v1/silences").json()["silences"]] == [silence_id]
    assert client.delete(f"/v1/silences/{silence_id}", headers=AUTH).status_code == 204
    assert client.delete(f"/v1/silences/{silence_id}", headers=AUTH).status_code == 404
    invalid = client.post("/v1/silences", headers=AUTH, json={"matchers": {}, "ends_at": "x", "created_by": ""})
    assert invalid.status_code == 422 and {e["field"] for e in invalid.json()["detail"]} >= {"body.matchers", "body.ends_at"}


def test_oversized_bodies_are_rejected(client: TestClient) -> None:
    response = client.put("/v1/models/m/reference", content=b"x" * 1_000_001, headers=AUTH)
    assert response.status_code == 413 and response.json()["error"] == "payload_too_large"


def test_health_readiness_and_metrics(store: SqlStore, client: TestClient) -> None:
    seed(store, 10)
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"
    text = client.get("/metrics").text
    for name in ("kdwatch_window_agreement", "kdwatch_window_events", "kdwatch_window_end_timestamp_seconds"):
        assert f'{name}{{model="m",student_version="s1"}}' in text
    assert "/docs" in client.get("/").text and client.get("/openapi.json").status_code == 200


def test_metrics_count_sli_events_of_final_windows_across_scrapes_that_read_only_new_writes(store: SqlStore,
                                                                                           client: TestClient) -> None:
    def sli(text: str, outcome: str) -> float:
        line = next(x for x in text.splitlines()
                    if x.startswith(f'kdwatch_sli_events_total{{model="m",outcome="{outcome}",sli="agreement"'))
        return float(line.rsplit(" ", 1)[1])

    seed(store, 10)
    expected = {"good": 0, "bad": 0}
    for state, final, _w in store.windows().values():
        assert final
        expected["good"] += state.fidelity.n_agree
        expected["bad"] += state.fidelity.n_joined - state.fidelity.n_agree
    first = client.get("/metrics").text
    assert (sli(first, "good"), sli(first, "bad")) == (expected["good"], expected["bad"])
    # One more final window and one still open: the next scrape adds the final one only.
    changes = Changes()
    done, open_ = WindowState(n=5), WindowState(n=5)
    done.fidelity.n_joined, done.fidelity.n_agree = 7, 6
    open_.fidelity.n_joined, open_.fidelity.n_agree = 50, 0
    changes.closed[WindowKey("m", "s1", T0 + 100 * MIN)] = done
    changes.windows[WindowKey("m", "s1", T0 + 101 * MIN)] = open_
    store.commit_batch("g", 0, MIN, changes, {})
    second = client.get("/metrics").text
    assert (sli(second, "good"), sli(second, "bad")) == (expected["good"] + 6, expected["bad"] + 1)
    end = next(x for x in second.splitlines() if x.startswith('kdwatch_window_end_timestamp_seconds{model="m",student_version="s1"}'))
    assert float(end.rsplit(" ", 1)[1]) == (T0 + 101 * MIN) / 1000  # the newest final window ends there
