"""The REST API (FastAPI, versioned under /v1; OpenAPI at /docs), one router per area.

Reads are open unless ``KDWATCH_API_READ_TOKEN_REQUIRED`` is set; every write needs the bearer API
key (``KDWATCH_API_KEY``), compared in constant time. Errors are 4xx with a JSON body
``{"error": ..., "detail": ...}``; request bodies are limited in size.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from kdwatch.api import alerts, health, references, reports, slos, windows
from kdwatch.api.context import MAX_BODY_BYTES, ApiContext, ApiSettings
from kdwatch.httperrors import install_json_errors
from kdwatch.metrics import KdwatchCollector
from kdwatch.storage.jobs import JobStore
from kdwatch.storage.slo_store import SloSqlStore
from kdwatch.storage.sql import SqlStore

__all__ = ["MAX_BODY_BYTES", "ApiSettings", "create_app"]


def create_app(store: SqlStore, settings: ApiSettings, registry: CollectorRegistry | None = None,
               readiness: Callable[[], dict[str, str]] | None = None,
               lag: Callable[[], dict[tuple[str, str, int], int]] | None = None) -> FastAPI:
    """The app over ``store``; ``readiness`` adds checks (e.g. Kafka) to /readyz; ``lag`` feeds kdwatch_consumer_lag."""
    slo_store = SloSqlStore(store.engine)
    registry = registry or CollectorRegistry()
    registry.register(KdwatchCollector(store, slo_store, lag=lag))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        close = getattr(lag, "close", None)
        if close is not None:
            close()
        store.close()

    app = FastAPI(title="kdwatch", version="1", lifespan=lifespan)
    app.state.context = ApiContext(store, slo_store, JobStore(store.engine), settings, readiness)
    app.state.registry = registry
    app.state.windows_query = windows.WindowsQuery(store, settings.cache_ttl_s)
    install_json_errors(app, settings.max_body_bytes)
    for area in (health, windows, reports, references, slos, alerts):
        app.include_router(area.router)
    return app
