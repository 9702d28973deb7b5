"""Secrets (webhook secrets, the API key, database passwords) never reach logs or API responses."""

from __future__ import annotations

import logging
import subprocess
import sys

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from kdwatch.api import ApiSettings, create_app
from kdwatch.slo.dispatch import Dispatcher, Receiver
from kdwatch.slo.live import LiveConfig, LiveEngine
from kdwatch.slo.webhooks import new_secret
from kdwatch.storage.slo_store import SloSqlStore
from kdwatch.storage.sql import SqlStore
from tests.integration.test_live_engine import SLOS, T0, Clock, store_minutes

API_KEY = "sekret-api-key-0123456789abcdef"


def test_secrets_stay_out_of_logs_and_responses(store: SqlStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    webhook_secret = new_secret()
    slo_store = SloSqlStore(store.engine)
    # A receiver that is down: failures get logged and recorded; the secret must not be.
    receiver = Receiver("retrain", "http://127.0.0.1:9/unreachable", webhook_secret, timeout_s=1)
    clock = Clock(T0 / 1000 + 4 * 3600)
    with httpx.Client() as client:
        engine = LiveEngine(SLOS, store, slo_store, Dispatcher(slo_store, {"retrain": receiver}, client, clock=clock),
                            LiveConfig(retrain_webhook=receiver, group_wait_ms=0), clock=clock, client=client)
        store_minutes(store, 0, 150, incident=(60, 240))
        engine.run_once()
    deliveries = slo_store.deliveries()
    assert deliveries and deliveries[0]["last_error"]

    app = create_app(store, ApiSettings(api_key=API_KEY), CollectorRegistry())
    with TestClient(app) as api:
        paths = api.get("/openapi.json").json()["paths"]
        gets = [path for path, operations in paths.items() if "get" in operations and "{" not in path]
        assert {"/v1/slos", "/v1/alerts", "/v1/deliveries", "/metrics"} <= set(gets)
        bodies = [api.get(path).text for path in gets]
        bodies.append(api.get("/v1/slos/agreement").text)
        bodies.append(api.post("/v1/silences", json={}, headers={"Authorization": "Bearer wrong"}).text)
    secret_body = webhook_secret.removeprefix("whsec_")
    for text in [caplog.text, *bodies, repr(deliveries)]:
        assert webhook_secret not in text and secret_body not in text and API_KEY not in text


def test_the_cli_does_not_print_the_database_password(tmp_path: pytest.TempPathFactory) -> None:
    url = "postgresql+psycopg://kdwatch:hunter2-db-password@127.0.0.1:1/nowhere"
    result = subprocess.run([sys.executable, "-m", "kdwatch.cli", "db", "upgrade", "--database-url", url],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 3 and "database unavailable" in result.stderr
    assert "hunter2-db-password" not in result.stdout + result.stderr


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_an_api_built_from_settings_holding_every_secret_never_shows_one(database_url: str,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    from kdwatch.settings import load_settings
    from kdwatch.wiring import build_api, open_store

    caplog.set_level(logging.DEBUG)
    password = "hunter2-db-password"
    # The test cluster trusts local connections, so the password is carried, as in production, and unused.
    url = database_url.replace("postgresql+psycopg://kdwatch@", f"postgresql+psycopg://kdwatch:{password}@")
    secrets = {"alert_webhook_secret": new_secret(), "retrain_webhook_secret": new_secret(), "runner_webhook_secret": new_secret()}
    settings = load_settings(database_url=url, api_key=API_KEY, bootstrap_servers="127.0.0.1:9", **secrets)
    assert password in settings.database_url.get_secret_value()
    with TestClient(build_api(open_store(settings.database_url), settings)) as api:
        paths = api.get("/openapi.json").json()["paths"]
        bodies = [api.get(path).text for path, operations in paths.items() if "get" in operations and "{" not in path]
        bodies += [api.get("/readyz").text, api.get("/v1/slos/nope").text, repr(settings), str(settings.model_dump())]
        bodies.append(api.put("/v1/slos/x", json={"objective": 2}, headers={"Authorization": f"Bearer {API_KEY}"}).text)
    forbidden = [password, API_KEY, *secrets.values(), *(s.removeprefix("whsec_") for s in secrets.values())]
    for text in [caplog.text, *bodies]:
        assert not any(secret in text for secret in forbidden)
