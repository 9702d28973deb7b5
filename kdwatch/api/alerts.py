"""Alerts firing and sent, silences, webhook deliveries and the training runner's jobs."""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Response
from pydantic import BaseModel, Field

from kdwatch.api.context import Context, Read, Write
from kdwatch.slo.engine import Silence, SloEngine
from kdwatch.storage.jobs import public_job
from kdwatch.timestamps import rfc3339

router = APIRouter()


class SilenceIn(BaseModel):
    matchers: dict[str, str] = Field(min_length=1, description="label -> value, all must match")
    starts_at: datetime | None = None
    ends_at: datetime
    created_by: str = Field(min_length=1, max_length=256)
    comment: str = Field("", max_length=4096)


@router.get("/v1/alerts")
def alerts(context: Context, _: Read) -> dict[str, Any]:
    engine = SloEngine(context.slo_file())
    state, _through = context.slo_store.load_engine("default")
    engine.load_state(state)
    firing = [{"labels": a.labels, "fingerprint": a.fingerprint,
               "started_at": rfc3339(a.started_at) if a.started_at is not None else None} for a in engine.firing()]
    history = [d["payload"] for d in context.slo_store.deliveries() if d["receiver"] == "alert-webhook"]
    return {"firing": firing, "history": history}


@router.get("/v1/silences")
def list_silences(context: Context, _: Read) -> dict[str, Any]:
    return {"silences": [s.__dict__ for s in context.slo_store.silences()]}


@router.post("/v1/silences", status_code=201)
def create_silence(body: SilenceIn, context: Context, _: Write) -> dict[str, Any]:
    now = int(time.time() * 1000)
    starts = int(body.starts_at.timestamp() * 1000) if body.starts_at else now
    ends = int(body.ends_at.timestamp() * 1000)
    if ends <= starts:
        raise HTTPException(422, "ends_at must be after starts_at")
    silence = Silence(f"sil_{uuid.uuid4().hex[:16]}", body.matchers, starts, ends, body.created_by, body.comment)
    context.slo_store.add_silence(silence)
    return silence.__dict__


@router.delete("/v1/silences/{silence_id}", status_code=204)
def expire_silence(silence_id: str, context: Context, _: Write) -> Response:
    if not context.slo_store.expire_silence(silence_id, int(time.time() * 1000)):
        raise HTTPException(404, f"no active silence {silence_id!r}")
    return Response(status_code=204)


@router.get("/v1/deliveries")
def deliveries(context: Context, _: Read) -> dict[str, Any]:
    return {"deliveries": context.slo_store.deliveries()}


@router.get("/v1/models/{model}/retrain-jobs")
def retrain_jobs(model: str, context: Context, _: Read, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    """The training runner's jobs for this model, newest first: status, log, metrics, the new student_version."""
    return {"jobs": [public_job(j) for j in context.jobs.list(model, limit)]}
