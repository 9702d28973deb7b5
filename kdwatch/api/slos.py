"""SLOs: list, create or replace, delete, and one SLO's status (budget, burn rates, firing pairs)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, HTTPException, Response

from kdwatch.api.context import ApiContext, Context, Read, Write
from kdwatch.errors import ConfigError
from kdwatch.slo.burn import budget_remaining, burn_rate
from kdwatch.slo.config import SloFile, parse_slo_file
from kdwatch.slo.engine import SloEngine

router = APIRouter()


def _save(context: ApiContext, document: dict[str, Any]) -> SloFile:
    try:
        parsed = parse_slo_file(document)
    except ConfigError as exc:
        raise HTTPException(422, {"field": exc.field, "message": str(exc)}) from None
    context.slo_store.put_slo_document(parsed.model_dump(mode="json", exclude_none=True), int(time.time() * 1000))
    return parsed


@router.get("/v1/slos")
def list_slos(context: Context, _: Read) -> dict[str, Any]:
    config = context.slo_file()
    return {"slos": [s.model_dump(mode="json", exclude_none=True) for s in config.slos],
            "retrain": [r.model_dump(mode="json", exclude_none=True) for r in config.retrain]}


@router.put("/v1/slos/{name}")
def put_slo(name: str, body: dict[str, Any], context: Context, _: Write) -> dict[str, Any]:
    document = context.slo_file().model_dump(mode="json", exclude_none=True)
    slos = [s for s in document.get("slos", []) if s["name"] != name]
    slos.append({**body, "name": name})
    document["slos"] = slos
    saved = _save(context, document)
    return next(s.model_dump(mode="json", exclude_none=True) for s in saved.slos if s.name == name)


@router.delete("/v1/slos/{name}", status_code=204)
def delete_slo(name: str, context: Context, _: Write) -> Response:
    document = context.slo_file().model_dump(mode="json", exclude_none=True)
    if not any(s["name"] == name for s in document.get("slos", [])):
        raise HTTPException(404, f"no SLO {name!r}")
    document["slos"] = [s for s in document["slos"] if s["name"] != name]
    document["retrain"] = [p for p in document.get("retrain", []) if all(c.get("slo") != name for c in p["when"])]
    _save(context, document)
    return Response(status_code=204)


@router.get("/v1/slos/{name}")
def slo_status(name: str, context: Context, _: Read) -> dict[str, Any]:
    config = context.slo_file()
    slo = next((s for s in config.slos if s.name == name), None)
    if slo is None:
        raise HTTPException(404, f"no SLO {name!r}")
    engine = SloEngine(config)
    state, through = context.slo_store.load_engine("default")
    engine.load_state(state)
    series = engine.series[name]
    pairs = []
    for w in engine.windows[name]:
        bad_l, total_l = series.sums(through, w.long_ms)
        bad_s, total_s = series.sums(through, w.short_ms)
        alert = engine.alerts[(name, w.severity, w.tier)]
        pairs.append({"severity": w.severity, "tier": w.tier, "burn_rate_threshold": w.burn_rate,
                      "burn_long": burn_rate(bad_l, total_l, slo.objective), "burn_short": burn_rate(bad_s, total_s, slo.objective),
                      "firing": alert.firing})
    bad, total = series.sums(through, slo.period_ms)
    return {"slo": slo.model_dump(mode="json", exclude_none=True), "evaluated_through": through,
            "budget_remaining": budget_remaining(bad, total, slo.objective), "events": total, "bad": bad,
            "status": "firing" if any(p["firing"] for p in pairs) else "ok", "windows": pairs}
