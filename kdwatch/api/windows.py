"""Windows over time: ``GET /v1/models`` and ``GET /v1/models/{model}/windows`` with its two-level cache."""

from __future__ import annotations

import gzip
import io
import threading
import time
from collections import OrderedDict
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, HTTPException, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from kdwatch.analyzer.rollup import rollup
from kdwatch.analyzer.window import window_result
from kdwatch.api.context import Context, Read, parse_time
from kdwatch.storage.sql import SqlStore
from kdwatch.timestamps import rfc3339

CACHE_ENTRIES = 256
BUCKET_CACHE_ENTRIES = 200_000
STEPS = {"1m": 60_000, "5m": 300_000, "1h": 3_600_000, "1d": 86_400_000}

router = APIRouter()

CacheKey = tuple[str, str | None, int | None, int | None, str, str]


class WindowsQuery:
    """Builds the windows endpoint's responses and caches them at two levels.

    Whole responses for ``ttl_s`` (so results lag by at most that), and below them merged buckets,
    each keyed with its own version (rows, newest update): while new windows arrive only the buckets
    they touch are merged again. Buckets are kept as their JSON bytes: a month of hourly rows as dicts
    is ~10^5 objects for the garbage collector to walk on every full collection, which showed up as
    the endpoint's p99.
    """

    def __init__(self, store: SqlStore, ttl_s: float) -> None:
        self.store = store
        self.ttl_s = ttl_s
        # key -> (expiry, response, its gzip form, change signature)
        self._responses: OrderedDict[CacheKey, tuple[float, Response, Response, Any]] = OrderedDict()
        self._refreshing: set[CacheKey] = set()
        self._buckets: OrderedDict[tuple[Any, ...], tuple[tuple[int, int], bytes]] = OrderedDict()
        self._lock = threading.Lock()

    async def get(self, key: CacheKey, gzip_ok: bool) -> Response:
        """A cached response when there is one (stale ones are refreshed in the background), else a new one."""
        with self._lock:
            hit = self._responses.get(key)
            if hit is not None:
                self._responses.move_to_end(key)
                if hit[0] <= time.monotonic() and key not in self._refreshing:
                    # Stale: serve it now and refresh in the background (no request waits for the refresh).
                    self._refreshing.add(key)
                    threading.Thread(target=self._refresh, args=(key, gzip_ok), daemon=True).start()
                return hit[2] if gzip_ok else hit[1]
            self._refreshing.add(key)
        # A cache hit (above) answers on the event loop; only a build goes to the thread pool (database, merging).
        return await run_in_threadpool(self._refresh, key, gzip_ok)

    def _refresh(self, key: CacheKey, gzip_ok: bool) -> Response:
        try:
            # One cheap aggregate first (SqlStore.change_signature): unchanged since the last build means
            # the same response, with no GROUP BY and no merge.
            signature = self.store.change_signature(key[0])
            with self._lock:
                built = self._responses.get(key)
            if built is not None and built[3] == signature:
                fresh, packed = built[1], built[2]
            else:
                fresh = self._build(*key)
                fresh.headers["vary"] = "accept-encoding"
                packed = _gzipped(fresh)
            with self._lock:
                self._responses[key] = (time.monotonic() + self.ttl_s, fresh, packed, signature)
                while len(self._responses) > CACHE_ENTRIES:
                    self._responses.popitem(last=False)
            return packed if gzip_ok else fresh
        finally:
            with self._lock:
                self._refreshing.discard(key)

    def _build(self, model: str, version: str | None, start: int | None, end: int | None, step: str, format: str) -> Response:
        step_ms = STEPS[step]
        versions = self.store.bucket_versions(model, version, start, end, step_ms)
        if not versions and not self.store.data_version(model)[0]:
            raise HTTPException(404, f"no windows of model {model!r}")
        reference = self.store.references().get(model)
        fingerprint = reference.fingerprint if reference is not None else ""
        rows_by_bucket: dict[tuple[str, int], bytes] = {}
        stale: list[tuple[str, int]] = []
        with self._lock:
            for bucket, ver in versions.items():
                hit = self._buckets.get((model, *bucket, step_ms, fingerprint))
                if hit is not None and hit[0] == ver:
                    rows_by_bucket[bucket] = hit[1]
                else:
                    stale.append(bucket)
        if stale:
            rows_by_bucket.update(self._merge(model, version, start, end, step, stale, reference))
            with self._lock:
                for bucket in stale:
                    if bucket in rows_by_bucket:
                        self._buckets[(model, *bucket, step_ms, fingerprint)] = (versions[bucket], rows_by_bucket[bucket])
                while len(self._buckets) > BUCKET_CACHE_ENTRIES:
                    self._buckets.popitem(last=False)
        encoded = [rows_by_bucket[b] for b in sorted(rows_by_bucket, key=lambda vb: (vb[1], vb[0]))]
        return _encode(model, step, encoded, format)

    def _merge(self, model: str, version: str | None, start: int | None, end: int | None, step: str,
               stale: list[tuple[str, int]], reference: Any) -> dict[tuple[str, int], bytes]:
        """The stale buckets merged again from the stored window states, as JSON rows."""
        step_ms = STEPS[step]
        lo = min(b for _v, b in stale)
        hi = max(b for _v, b in stale) + step_ms
        stored = self.store.windows(model=model, student_version=version, start_ms=max(lo, start or lo),
                                    end_ms=min(hi, end) if end is not None else hi)
        if any(step_ms % wms for (_s, _f, wms) in stored.values()):
            raise HTTPException(422, f"step {step} is not a multiple of the stored window size")
        wanted = set(stale)
        rows: dict[tuple[str, int], bytes] = {}
        for b in rollup(((k.model, k.student_version, k.window_start, st, f) for k, (st, f, _w) in stored.items()
                         if (k.student_version, k.window_start - k.window_start % step_ms) in wanted), step_ms):
            row = window_result(b.model, b.student_version, b.start_ms, step_ms, b.state, reference)
            row["final"] = b.final
            row["windows"] = b.windows
            rows[(b.student_version, b.start_ms)] = orjson.dumps(row)
        return rows


def _encode(model: str, step: str, encoded: list[bytes], format: str) -> Response:
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


def _gzipped(response: Response) -> Response:
    """The response compressed once, when it is built: a month of hourly rows is ~1.8 MB of JSON, ~10x less
    gzipped, and copying it to each client was the endpoint's tail latency. Served to clients sending
    Accept-Encoding: gzip (every HTTP library and browser does)."""
    headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
    return Response(gzip.compress(bytes(response.body), compresslevel=6), media_type=response.media_type,
                    headers={**headers, "content-encoding": "gzip", "vary": "accept-encoding"})


@router.get("/v1/models")
def models(context: Context, _: Read) -> dict[str, Any]:
    seen: dict[str, dict[str, dict[str, Any]]] = {}
    for key, (_state, _final, window_ms) in context.store.windows().items():
        entry = seen.setdefault(key.model, {}).setdefault(key.student_version, {"windows": 0, "last_window_end": 0})
        entry["windows"] += 1
        entry["last_window_end"] = max(entry["last_window_end"], key.window_start + window_ms)
    return {"models": [{"model": m, "versions": [
        {"student_version": v, "windows": e["windows"], "last_window_end": rfc3339(e["last_window_end"])}
        for v, e in sorted(versions.items())]} for m, versions in sorted(seen.items())]}


@router.get("/v1/models/{model}/windows", response_model=None)
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
    start, end = parse_time(from_, "from"), parse_time(to, "to")
    query: WindowsQuery = request.app.state.windows_query
    return await query.get((model, version, start, end, step, format), "gzip" in request.headers.get("accept-encoding", ""))
