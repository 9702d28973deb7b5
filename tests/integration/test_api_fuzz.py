"""API abuse: schemathesis against the OpenAPI spec (no 5xx, with and without the key) and injection strings."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from prometheus_client import CollectorRegistry

from kdwatch.api import ApiSettings, create_app
from kdwatch.storage.sql import SqlStore
from tests.integration.test_api import seed

KEY = "f" * 32
_DIR = Path(tempfile.mkdtemp(prefix="kdwatch-fuzz-"))
_STORE = SqlStore.from_url(f"sqlite:///{_DIR / 'k.db'}")
_STORE.migrate()
seed(_STORE, 30)
APP = create_app(_STORE, ApiSettings(api_key=KEY), CollectorRegistry())
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
# Deterministic in CI (derandomize); KDWATCH_FUZZ_EXAMPLES=300 explores randomly and longer.
@settings(max_examples=int(os.environ.get("KDWATCH_FUZZ_EXAMPLES", "25")), deadline=None,
          derandomize=not os.environ.get("KDWATCH_FUZZ_EXAMPLES"), suppress_health_check=list(HealthCheck))
def test_no_request_the_spec_allows_gets_a_5xx(case: schemathesis.Case) -> None:
    for headers in ({}, {"Authorization": f"Bearer {KEY}"}):
        response = case.call(headers=headers)
        assert response.status_code < 500, (case.method, case.formatted_path, response.status_code, response.text[:300])


INJECTIONS = ["' OR 1=1 --", "m'; DROP TABLE window_state; --", "../../etc/passwd", "<script>alert(1)</script>",
              "%00", "{{7*7}}", "${jndi:ldap://x/a}", "m\\u0000"]


@pytest.mark.parametrize("text", INJECTIONS)
def test_injection_strings_in_path_and_query_are_harmless(text: str) -> None:
    with TestClient(APP) as client:
        for path, params in ((f"/v1/models/{text}/windows", {}), ("/v1/models/m/windows", {"version": text}),
                             ("/v1/models/m/windows", {"from": text}), (f"/v1/slos/{text}", {}),
                             (f"/v1/models/{text}/report", {})):
            response = client.get(path, params=params)
            assert response.status_code < 500 and response.headers["content-type"].startswith("application/json"), path
            assert "<script>" not in response.text
        assert client.get("/v1/models/m/windows").json()["windows"]  # the table is still there
