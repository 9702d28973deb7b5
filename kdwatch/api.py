"""The REST API (FastAPI, versioned under /v1; OpenAPI at /docs).

Reads are open unless ``KDWATCH_API_READ_TOKEN_REQUIRED`` is set; every write needs the bearer API
key (``KDWATCH_API_KEY``), compared in constant time. Errors are 4xx with a JSON body
``{"error": ..., "detail": ...}``; request bodies are limited in size.
"""

from __future__ import annotations

import gzip
import hmac
import io
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from kdwatch.analyzer.drift import Reference
from kdwatch.analyzer.rollup import rollup
from kdwatch.analyzer.window import rfc3339, window_result
from kdwatch.collector.contract import parse_ts
from kdwatch.collector.offline import build_references
from kdwatch.errors import ConfigError, ContractError
from kdwatch.httperrors import install_json_errors
from kdwatch.metrics import KdwatchCollector
from kdwatch.slo.burn import budget_remaining, burn_rate
from kdwatch.slo.config import SloFile, parse_slo_file
from kdwatch.slo.engine import Silence, SloEngine, WindowInput, backtest
from kdwatch.storage.jobs import JobStore, public_job
from kdwatch.storage.slo_store import SloSqlStore
from kdwatch.storage.sql import SqlStore

CACHE_ENTRIES = 256
BUCKET_CACHE_ENTRIES = 200_000
STEPS = {"1m": 60_000, "5m": 300_000, "1h": 3_600_000, "1d": 86_400_000}
MAX_BODY_BYTES = 32 * 1024 * 1024  # a reference baseline upload is the largest body


class ApiSettings(BaseModel):
    api_key: str | None = None
    read_token_required: bool = False
    max_body_bytes: int = MAX_BODY_BYTES
    cache_ttl_s: float = 1.0


class SilenceIn(BaseModel):
    matchers: dict[str, str] = Field(min_length=1, description="label -> value, all must match")
    starts_at: datetime | None = None
    ends_at: datetime
    created_by: str = Field(min_length=1, max_length=256)
    comment: str = Field("", max_length=4096)


def _parse_time(value: str | None, name: str) -> int | None:
    """Query-string time: RFC 3339 or epoch milliseconds, within the contract's years (2000-2099)."""
    if value is None:
        return None
    try:
        return parse_ts(int(value) if value.isascii() and value.isdigit() else value, name)
    except ContractError:
        # The input is not echoed back: an error body never reflects what the caller sent.
        raise HTTPException(422, f"{name} must be RFC 3339 or epoch milliseconds in 2000-2099") from None


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    return header[7:] if header.lower().startswith("bearer ") else None


async def require_key(request: Request) -> None:
    """Writes: the bearer API key, compared in constant time."""
    settings: ApiSettings = request.app.state.api_settings
    if settings.api_key is None:
        raise HTTPException(403, "writes are disabled: set KDWATCH_API_KEY")
    token = _bearer(request)
    if token is None or not hmac.compare_digest(token.encode(), settings.api_key.encode()):
        raise HTTPException(401, "a valid bearer API key is required", headers={"WWW-Authenticate": "Bearer"})


async def require_read(request: Request) -> None:
    """Reads: open, unless the deployment requires the key for them too.

    Async (no I/O): FastAPI would otherwise hop to its thread pool for every request just to run it.
    """
    if request.app.state.api_settings.read_token_required:
        await require_key(request)


# Module level, so FastAPI can resolve them from the (postponed) annotations.
Read = Annotated[None, Depends(require_read)]
Write = Annotated[None, Depends(require_key)]


def create_app(store: SqlStore, settings: ApiSettings, registry: CollectorRegistry | None = None,
               readiness: Callable[[], dict[str, str]] | None = None,
               lag: Callable[[], dict[tuple[str, str, int], int]] | None = None) -> FastAPI:
    """The app over ``store``; ``readiness`` adds checks (e.g. Kafka) to /readyz; ``lag`` feeds kdwatch_consumer_lag."""
    slo_store = SloSqlStore(store.engine)
    jobs = JobStore(store.engine)
    registry = registry or CollectorRegistry()
    registry.register(KdwatchCollector(store, slo_store, lag=lag))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        close = getattr(lag, "close", None)
        if close is not None:
            close()
        store.close()

    # Whole responses of the windows endpoint for ``cache_ttl_s`` (so results lag by at most that), and
    # below them merged buckets, each keyed with its own version (rows, newest update): while new
    # windows arrive only the buckets they touch are merged again. Buckets are kept as their JSON
    # bytes: a month of hourly rows as dicts is ~10^5 objects for the garbage collector to walk on
    # every full collection, which showed up as the endpoint's p99.
    # expiry, response, its gzip form, change signature
    cache: OrderedDict[tuple[Any, ...], tuple[float, Response, Response, Any]] = OrderedDict()
    refreshing: set[tuple[Any, ...]] = set()
    bucket_cache: OrderedDict[tuple[Any, ...], tuple[tuple[int, int], bytes]] = OrderedDict()
    cache_lock = threading.Lock()

    app = FastAPI(title="kdwatch", version="1", lifespan=lifespan)
    app.state.api_settings = settings

    install_json_errors(app, settings.max_body_bytes)

    # ---- health ----

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        checks: dict[str, str] = {}
        try:
            store.ping()
            checks["database"] = "ok"
        except Exception as exc:  # any failure means not ready; the reason is reported, not raised
            checks["database"] = f"unavailable: {type(exc).__name__}"
        if readiness is not None:
            checks.update(readiness())
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks}, status_code=200 if ready else 503)

    @app.get("/metrics")
    def metrics(_: Read) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # ---- models and windows ----

    @app.get("/v1/models")
    def models(_: Read) -> dict[str, Any]:
        seen: dict[str, dict[str, dict[str, Any]]] = {}
        for key, (_state, _final, window_ms) in store.windows().items():
            entry = seen.setdefault(key.model, {}).setdefault(key.student_version, {"windows": 0, "last_window_end": 0})
            entry["windows"] += 1
            entry["last_window_end"] = max(entry["last_window_end"], key.window_start + window_ms)
        return {"models": [{"model": m, "versions": [
            {"student_version": v, "windows": e["windows"], "last_window_end": rfc3339(e["last_window_end"])}
            for v, e in sorted(versions.items())]} for m, versions in sorted(seen.items())]}

    @app.get("/v1/models/{model}/windows", response_model=None)
    async def windows(
        model: str,
        request: Request,
        _: Read,
        from_: Annotated[str | None, Query(alias="from", description="RFC 3339 or epoch ms, inclusive")] = None,
        to: Annotated[str | None, Query(description="RFC 3339 or epoch ms, exclusive")] = None,
        version: str | None = None,
        step: Literal["1m", "5m", "1h", "1d"] = "1m",
        format: Literal["json", "csv", "parquet"] = "json",
    ) -> Any:
        start, end = _parse_time(from_, "from"), _parse_time(to, "to")
        key = (model, version, start, end, step, format)

        gzip_ok = "gzip" in request.headers.get("accept-encoding", "")

        def refresh() -> Response:
            try:
                # One cheap aggregate first (storage.sql.SqlStore.change_signature): unchanged since the last
                # build means the same response, with no GROUP BY and no merge.
                signature = store.change_signature(model)
                with cache_lock:
                    built = cache.get(key)
                if built is not None and built[3] == signature:
                    fresh, packed = built[1], built[2]
                else:
                    fresh = _windows_response(model, version, start, end, step, format)
                    fresh.headers["vary"] = "accept-encoding"
                    packed = _gzipped(fresh)
                with cache_lock:
                    cache[key] = (time.monotonic() + settings.cache_ttl_s, fresh, packed, signature)
                    while len(cache) > CACHE_ENTRIES:
                        cache.popitem(last=False)
                return packed if gzip_ok else fresh
            finally:
                with cache_lock:
                    refreshing.discard(key)

        with cache_lock:
            hit = cache.get(key)
            if hit is not None:
                cache.move_to_end(key)
                if hit[0] <= time.monotonic() and key not in refreshing:
                    # Stale: serve it now and refresh in the background (no request waits for the refresh).
                    refreshing.add(key)
                    threading.Thread(target=refresh, daemon=True).start()
                return hit[2] if gzip_ok else hit[1]
            refreshing.add(key)
        # A cache hit (above) answers on the event loop; only a build goes to the thread pool (database, merging).
        return await run_in_threadpool(refresh)

    def _gzipped(response: Response) -> Response:
        """The response compressed once, when it is built: a month of hourly rows is ~1.8 MB of JSON, ~10x less
        gzipped, and copying it to each client was the endpoint's tail latency. Served to clients sending
        Accept-Encoding: gzip (every HTTP library and browser does)."""
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        return Response(gzip.compress(bytes(response.body), compresslevel=6), media_type=response.media_type,
                        headers={**headers, "content-encoding": "gzip", "vary": "accept-encoding"})

    def _windows_response(model: str, version: str | None, start: int | None, end: int | None, step: str,
                          format: str) -> Response:
        step_ms = STEPS[step]
        versions = store.bucket_versions(model, version, start, end, step_ms)
        if not versions and not store.data_version(model)[0]:
            raise HTTPException(404, f"no windows of model {model!r}")
        reference = store.references().get(model)
        fingerprint = reference.fingerprint if reference is not None else ""
        rows_by_bucket: dict[tuple[str, int], bytes] = {}
        stale: list[tuple[str, int]] = []
        with cache_lock:
            for bucket, ver in versions.items():
                hit = bucket_cache.get((model, *bucket, step_ms, fingerprint))
                if hit is not None and hit[0] == ver:
                    rows_by_bucket[bucket] = hit[1]
                else:
                    stale.append(bucket)
        if stale:
            lo = min(b for _v, b in stale)
            hi = max(b for _v, b in stale) + step_ms
            stored = store.windows(model=model, student_version=version, start_ms=max(lo, start or lo),
                                   end_ms=min(hi, end) if end is not None else hi)
            if any(step_ms % wms for (_s, _f, wms) in stored.values()):
                raise HTTPException(422, f"step {step} is not a multiple of the stored window size")
            wanted = set(stale)
            for b in rollup(((k.model, k.student_version, k.window_start, st, f) for k, (st, f, _w) in stored.items()
                             if (k.student_version, k.window_start - k.window_start % step_ms) in wanted), step_ms):
                row = window_result(b.model, b.student_version, b.start_ms, step_ms, b.state, reference)
                row["final"] = b.final
                row["windows"] = b.windows
                rows_by_bucket[(b.student_version, b.start_ms)] = orjson.dumps(row)
            with cache_lock:
                for bucket in stale:
                    if bucket in rows_by_bucket:
                        bucket_cache[(model, *bucket, step_ms, fingerprint)] = (versions[bucket], rows_by_bucket[bucket])
                while len(bucket_cache) > BUCKET_CACHE_ENTRIES:
                    bucket_cache.popitem(last=False)
        encoded = [rows_by_bucket[b] for b in sorted(rows_by_bucket, key=lambda vb: (vb[1], vb[0]))]
        if format == "json":  # the bytes orjson.dumps({"model", "step", "windows": rows}) would give
            body = b"".join((b'{"model":', orjson.dumps(model), b',"step":', orjson.dumps(step), b',"windows":[',
                             b",".join(encoded), b"]}"))
            return Response(body, media_type="application/json")
        import pandas as pd

        frame = pd.json_normalize([orjson.loads(row) for row in encoded])
        if format == "csv":
            return Response(frame.to_csv(index=False), media_type="text/csv",
                            headers={"content-disposition": f'attachment; filename="{model}-windows.csv"'})
        buffer = io.BytesIO()
        frame.astype({c: "string" for c in frame.columns if frame[c].dtype == object}).to_parquet(buffer, index=False)
        return Response(buffer.getvalue(), media_type="application/vnd.apache.parquet",
                        headers={"content-disposition": f'attachment; filename="{model}-windows.parquet"'})

    @app.get("/v1/models/{model}/report", response_class=HTMLResponse)
    def report(
        model: str,
        _: Read,
        from_: Annotated[str | None, Query(alias="from")] = None,
        to: str | None = None,
        step: Literal["auto", "1m", "5m", "1h", "1d"] = "auto",
    ) -> HTMLResponse:
        """A self-contained HTML report: fidelity over time, reliability, PSI, MIA ROC, budgets, alerts."""
        from kdwatch.report import ReportData, render  # matplotlib: loaded only for reports

        start, end = _parse_time(from_, "from"), _parse_time(to, "to")
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
        refs = store.references()
        reference = refs.get(model)
        buckets = rollup(((k.model, k.student_version, k.window_start, st, f) for k, (st, f, _w) in stored.items()), STEPS[chosen])
        config = slo_file()
        # Per-window results are needed only by timeslice SLIs and PSI retrain conditions.
        needs_results = any(s.model == model and s.sli.timeslices is not None for s in config.slos) or any(
            c.psi_feature is not None for p in config.retrain if p.model == model for c in p.when)
        inputs = [WindowInput(k.model, k.student_version, k.window_start + w, st,
                              window_result(k.model, k.student_version, k.window_start, w, st, reference) if needs_results else {})
                  for k, (st, _f, w) in sorted(stored.items(), key=lambda kv: kv[0].window_start)]
        mine = [sl for sl in config.slos if sl.model == model]
        events = [n for n in backtest(config, inputs) if n.get("model") == model]
        budgets: dict[str, list[tuple[int, float]]] = {}
        engine = SloEngine(config)
        for slo in mine:
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
        for job in jobs.list(model, 1000):  # retrains on the timeline, at the event time that triggered them
            at = job["request"].get("trigger", {}).get("at")
            if isinstance(at, str):
                target = job["student_version"] or ""
                events.append({"at": at, "type": "retrain job", "status": job["status"],
                               "reason": f"{job['parent_version'] or '?'} -> {target}" if target else (job["error"] or "")})
        events.sort(key=lambda e: e["at"])
        return HTMLResponse(render(ReportData(model, chosen, buckets, reference, budgets, events)))

    # ---- references ----

    @app.put("/v1/models/{model}/reference")
    async def put_reference(model: str, request: Request, _: Write) -> dict[str, Any]:
        try:
            built = build_references((await request.body()).splitlines())
        except ContractError as exc:
            raise HTTPException(422, exc.message) from None
        if model not in built:
            raise HTTPException(422, f"no predictions of model {model!r} in the body (JSONL of contract-v1 predictions)")
        reference, count = built[model]
        store.put_reference(model, reference)
        return {"model": model, "predictions": count, **_describe(reference)}

    @app.get("/v1/models/{model}/reference")
    def get_reference(model: str, _: Read) -> dict[str, Any]:
        reference = store.references().get(model)
        if reference is None:
            raise HTTPException(404, f"no reference for model {model!r}")
        return {"model": model, **_describe(reference)}

    # ---- SLOs ----

    def slo_file() -> SloFile:
        document = slo_store.get_slo_document()
        return parse_slo_file(document or {})

    def save(document: dict[str, Any]) -> SloFile:
        try:
            parsed = parse_slo_file(document)
        except ConfigError as exc:
            raise HTTPException(422, {"field": exc.field, "message": str(exc)}) from None
        slo_store.put_slo_document(parsed.model_dump(mode="json", exclude_none=True), int(time.time() * 1000))
        return parsed

    @app.get("/v1/slos")
    def list_slos(_: Read) -> dict[str, Any]:
        config = slo_file()
        return {"slos": [s.model_dump(mode="json", exclude_none=True) for s in config.slos],
                "retrain": [r.model_dump(mode="json", exclude_none=True) for r in config.retrain]}

    @app.put("/v1/slos/{name}")
    def put_slo(name: str, body: dict[str, Any], _: Write) -> dict[str, Any]:
        document = slo_file().model_dump(mode="json", exclude_none=True)
        slos = [s for s in document.get("slos", []) if s["name"] != name]
        slos.append({**body, "name": name})
        document["slos"] = slos
        saved = save(document)
        return next(s.model_dump(mode="json", exclude_none=True) for s in saved.slos if s.name == name)

    @app.delete("/v1/slos/{name}", status_code=204)
    def delete_slo(name: str, _: Write) -> Response:
        document = slo_file().model_dump(mode="json", exclude_none=True)
        if not any(s["name"] == name for s in document.get("slos", [])):
            raise HTTPException(404, f"no SLO {name!r}")
        document["slos"] = [s for s in document["slos"] if s["name"] != name]
        document["retrain"] = [p for p in document.get("retrain", []) if all(c.get("slo") != name for c in p["when"])]
        save(document)
        return Response(status_code=204)

    @app.get("/v1/slos/{name}")
    def slo_status(name: str, _: Read) -> dict[str, Any]:
        config = slo_file()
        slo = next((s for s in config.slos if s.name == name), None)
        if slo is None:
            raise HTTPException(404, f"no SLO {name!r}")
        engine = SloEngine(config)
        state, through = slo_store.load_engine("default")
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

    # ---- alerts, silences, deliveries ----

    @app.get("/v1/alerts")
    def alerts(_: Read) -> dict[str, Any]:
        engine = SloEngine(slo_file())
        state, _through = slo_store.load_engine("default")
        engine.load_state(state)
        firing = [{"labels": a.labels, "fingerprint": a.fingerprint,
                   "started_at": rfc3339(a.started_at) if a.started_at is not None else None} for a in engine.firing()]
        history = [d["payload"] for d in slo_store.deliveries() if d["receiver"] == "alert-webhook"]
        return {"firing": firing, "history": history}

    @app.get("/v1/silences")
    def list_silences(_: Read) -> dict[str, Any]:
        return {"silences": [s.__dict__ for s in slo_store.silences()]}

    @app.post("/v1/silences", status_code=201)
    def create_silence(body: SilenceIn, _: Write) -> dict[str, Any]:
        now = int(time.time() * 1000)
        starts = int(body.starts_at.timestamp() * 1000) if body.starts_at else now
        ends = int(body.ends_at.timestamp() * 1000)
        if ends <= starts:
            raise HTTPException(422, "ends_at must be after starts_at")
        silence = Silence(f"sil_{uuid.uuid4().hex[:16]}", body.matchers, starts, ends, body.created_by, body.comment)
        slo_store.add_silence(silence)
        return silence.__dict__

    @app.delete("/v1/silences/{silence_id}", status_code=204)
    def expire_silence(silence_id: str, _: Write) -> Response:
        if not slo_store.expire_silence(silence_id, int(time.time() * 1000)):
            raise HTTPException(404, f"no active silence {silence_id!r}")
        return Response(status_code=204)

    @app.get("/v1/deliveries")
    def deliveries(_: Read) -> dict[str, Any]:
        return {"deliveries": slo_store.deliveries()}

    @app.get("/v1/models/{model}/retrain-jobs")
    def retrain_jobs(model: str, _: Read, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        """The training runner's jobs for this model, newest first: status, log, metrics, the new student_version."""
        return {"jobs": [public_job(j) for j in jobs.list(model, limit)]}

    @app.get("/", include_in_schema=False)
    def root() -> PlainTextResponse:
        return PlainTextResponse("kdwatch API: see /docs\n")

    return app


def _describe(reference: Reference) -> dict[str, Any]:
    return {"fingerprint": reference.fingerprint, "features": {
        name: {"kind": "numeric" if fb.edges is not None else "categorical", "bins": fb.n_bins,
               "edges": fb.edges, "categories": fb.categories, "reference_n": sum(fb.reference_counts)}
        for name, fb in reference.features.items()}}
