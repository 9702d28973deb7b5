"""Liveness, readiness and the Prometheus scrape."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from kdwatch.api.context import Context, Read

router = APIRouter()


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(context: Context) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        context.store.ping()
        checks["database"] = "ok"
    except Exception as exc:  # any failure means not ready; the reason is reported, not raised
        checks["database"] = f"unavailable: {type(exc).__name__}"
    if context.readiness is not None:
        checks.update(context.readiness())
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks}, status_code=200 if ready else 503)


@router.get("/metrics")
def metrics(request: Request, _: Read) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
def root() -> PlainTextResponse:
    return PlainTextResponse("kdwatch API: see /docs\n")
