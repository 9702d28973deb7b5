"""``GET /v1/models/{model}/report``: a self-contained HTML report over a range of stored windows."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import HTMLResponse

from kdwatch.analyzer.rollup import rollup
from kdwatch.analyzer.window import WindowState, window_result
from kdwatch.api.context import ApiContext, Context, Read, parse_time
from kdwatch.api.windows import STEPS
from kdwatch.collector.records import WindowKey
from kdwatch.slo.config import SloFile
from kdwatch.slo.engine import SloEngine, WindowInput, backtest

router = APIRouter()

Stored = dict[WindowKey, tuple[WindowState, bool, int]]


@router.get("/v1/models/{model}/report", response_class=HTMLResponse)
def report(
    model: str,
    context: Context,
    _: Read,
    from_: Annotated[str | None, Query(alias="from")] = None,
    to: str | None = None,
    step: Literal["auto", "1m", "5m", "1h", "1d"] = "auto",
) -> HTMLResponse:
    """A self-contained HTML report: fidelity over time, reliability, PSI, MIA ROC, budgets, alerts."""
    from kdwatch.report import ReportData, render  # matplotlib: loaded only for reports

    store = context.store
    start, end = parse_time(from_, "from"), parse_time(to, "to")
    if start is None:  # default: the last day of data (a month of 1-minute windows is a slow page)
        rows, _newest = store.data_version(model)
        if rows == 0:
            raise HTTPException(404, f"no windows of model {model!r}")
        last = max(b for (_v, b) in store.bucket_versions(model, None, None, end, 3_600_000))
        start = last + 3_600_000 - 86_400_000
    stored = store.windows(model=model, start_ms=start, end_ms=end)
    if not stored:
        raise HTTPException(404, f"no windows of model {model!r} in that range")
    chosen: str = step
    if step == "auto":  # at most ~720 points on the charts
        span = max(k.window_start for k in stored) - min(k.window_start for k in stored)
        chosen = next(name for name, ms in STEPS.items() if span / ms <= 720 or name == "1d")
    reference = store.references().get(model)
    buckets = rollup(((k.model, k.student_version, k.window_start, st, f) for k, (st, f, _w) in stored.items()), STEPS[chosen])
    config = context.slo_file()
    inputs = _slo_inputs(config, model, stored, reference)
    events = [n for n in backtest(config, inputs) if n.get("model") == model] + _retrain_events(context, model)
    events.sort(key=lambda e: e["at"])
    return HTMLResponse(render(ReportData(model, chosen, buckets, reference, _budgets(config, model, inputs), events)))


def _slo_inputs(config: SloFile, model: str, stored: Stored, reference: Any) -> list[WindowInput]:
    # Per-window results are needed only by timeslice SLIs and PSI retrain conditions.
    needs_results = any(s.model == model and s.sli.timeslices is not None for s in config.slos) or any(
        c.psi_feature is not None for p in config.retrain if p.model == model for c in p.when)
    return [WindowInput(k.model, k.student_version, k.window_start + w, st,
                        window_result(k.model, k.student_version, k.window_start, w, st, reference) if needs_results else {})
            for k, (st, _f, w) in sorted(stored.items(), key=lambda kv: kv[0].window_start)]


def _budgets(config: SloFile, model: str, inputs: list[WindowInput]) -> dict[str, list[tuple[int, float]]]:
    """Each SLO's error budget remaining after each window, over the report's range."""
    budgets: dict[str, list[tuple[int, float]]] = {}
    engine = SloEngine(config)
    for slo in (sl for sl in config.slos if sl.model == model):
        bad = total = 0.0
        points = []
        for w in inputs:
            point = engine.point(slo, [w])
            if point is None:
                continue
            bad, total = bad + point[0], total + point[1]
            if total:
                points.append((w.end_ms, 1.0 - (bad / total) / (1.0 - slo.objective)))
        budgets[slo.name] = points
    return budgets


def _retrain_events(context: ApiContext, model: str) -> list[dict[str, Any]]:
    """Retrains on the timeline, at the event time that triggered them."""
    events = []
    for job in context.jobs.list(model, 1000):
        at = job["request"].get("trigger", {}).get("at")
        if isinstance(at, str):
            target = job["student_version"] or ""
            events.append({"at": at, "type": "retrain job", "status": job["status"],
                           "reason": f"{job['parent_version'] or '?'} -> {target}" if target else (job["error"] or "")})
    return events
