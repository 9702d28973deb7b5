"""The offline path: the same validation, join, windows and metrics over JSONL files.

Lines are merged by event time across the three files (as they would arrive in a stream), fed to one
:class:`PartitionJoiner`, and every window is closed at the end of input. With events no later than
the grace, the result equals the Kafka path's stored windows (tests/integration/test_streaming_equals_offline.py).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from kdwatch.analyzer.drift import CONFIDENCE, PREDICTED_CLASS, Reference, ReferenceBuilder
from kdwatch.analyzer.window import WindowState
from kdwatch.collector.contract import MAX_VALUE_BYTES, decode_prediction, parse_ts
from kdwatch.collector.ingest import ingest
from kdwatch.collector.join import PartitionJoiner
from kdwatch.collector.records import Changes, WindowKey
from kdwatch.errors import ContractError

# Batch size between end_batch() calls: bounds the un-aggregated contributions held at once.
BATCH = 5_000


def _parse(raw: bytes) -> tuple[int, dict[str, Any] | None]:
    """(event time for the merge, parsed object); -1 (emit at once) and None when unreadable.

    The object is handed to the decoder so each line is parsed once; an oversized line is left
    unparsed for the decoder to reject with its reason.
    """
    if len(raw) > MAX_VALUE_BYTES:
        return -1, None
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return -1, None
    if not isinstance(obj, dict):
        return -1, None
    ts = obj.get("ts")
    if type(ts) is int:
        return ts, obj
    if isinstance(ts, str):
        try:
            return parse_ts(ts), obj
        except ContractError:
            return -1, obj
    return -1, obj


def _lines(path: Path, kind: str, order: int) -> Iterator[tuple[int, int, int, str, bytes, dict[str, Any] | None]]:
    """The merge's entries of a JSONL file: (ts, input order, line number, kind, raw line, parsed)."""
    with path.open("rb") as handle:
        for lineno, line in enumerate(handle):
            line = line.rstrip(b"\r\n")
            if line.strip():
                ts, obj = _parse(line)
                yield (ts, order, lineno, kind, line, obj)


Stream = Iterator[tuple[int, int, int, str, bytes, dict[str, Any] | None]]


def _streams(predictions: Path, teacher: Path | None, labels: Path | None) -> dict[str, Stream]:
    """Each input's entries for the merge: JSONL lines, or Parquet rows as the objects they stand for."""
    from kdwatch.collector.columns import is_parquet
    from kdwatch.collector.parquet_io import parquet_lines
    from kdwatch.errors import SchemaError

    given = {"prediction": predictions, "teacher": teacher, "label": labels}
    paths = {kind: path for kind, path in given.items() if path is not None}
    kinds = {is_parquet(path) for path in paths.values()}
    if len(kinds) > 1:
        raise SchemaError("--predictions, --teacher and --labels must be all JSONL or all Parquet")
    reader = parquet_lines if kinds == {True} else _lines
    return {kind: reader(path, kind, order) for order, (kind, path) in enumerate(given.items()) if path is not None}


def merged_events(
    predictions: Path, teacher: Path | None = None, labels: Path | None = None
) -> Iterator[tuple[str, bytes, dict[str, Any] | None, str | None]]:
    """(kind, raw, parsed, exhausted) in event-time order across the files; ties keep file order, predictions first.

    ``exhausted`` names the input whose file just ended (after that record), so the watermark no
    longer waits for it.
    """
    streams = _streams(predictions, teacher, labels)
    # Heap entries: (ts, order, lineno, ...) are unique in their first three, so the dict is never compared.
    heads: list[tuple[int, int, int, str, bytes, dict[str, Any] | None]] = []
    for kind, stream in list(streams.items()):
        head = next(stream, None)
        if head is None:
            del streams[kind]
            yield kind, b"", None, kind
        else:
            heapq.heappush(heads, head)
    while heads:
        _ts, _order, _lineno, kind, raw, obj = heapq.heappop(heads)
        following = next(streams[kind], None)
        if following is None:
            yield kind, raw, obj, kind
        else:
            heapq.heappush(heads, following)
            yield kind, raw, obj, None


def build_references(lines: Iterable[bytes]) -> dict[str, tuple[Reference, int]]:
    """Per-model references (and how many predictions each holds) from JSONL baseline predictions.

    Audit records are skipped; an invalid line raises ContractError naming its line number.
    """
    builders: dict[str, ReferenceBuilder] = {}
    counts: dict[str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            event = decode_prediction(line)
        except ContractError as exc:
            raise ContractError(exc.reason, f"line {lineno}: {exc.reason}: {exc.message}") from None
        if event.audit is not None:
            continue
        builder = builders.setdefault(event.model, ReferenceBuilder())
        builder.add(CONFIDENCE, float(event.dist.probs.max()))
        builder.add(PREDICTED_CLASS, str(int(event.dist.probs.argmax())))
        for name, value in (event.features or {}).items():
            builder.add(name, value)
        counts[event.model] = counts.get(event.model, 0) + 1
    return {model: (builder.build(), counts[model]) for model, builder in builders.items()}


def load_reference(path: Path) -> dict[str, Reference]:
    """Per-model references from a JSONL or Parquet file of (valid) baseline predictions."""
    from kdwatch.collector.columns import is_parquet
    from kdwatch.collector.parquet_io import load_reference_parquet

    if is_parquet(path):
        return load_reference_parquet(path)
    with path.open("rb") as handle:
        return {model: reference for model, (reference, _n) in build_references(handle).items()}


def reference_loader(path: Path) -> Callable[[], dict[str, Reference]]:
    """Start loading a reference on a worker thread; the callable returned waits for it (re-raising its error).

    A Parquet reference is read and binned mostly inside Arrow and numpy, which release the GIL, so
    it overlaps the analysis on a second core; a JSONL reference gains nothing but loses nothing.
    """
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdwatch-reference")
    future = pool.submit(load_reference, path)
    pool.shutdown(wait=False)
    return future.result


def analyze_files(
    predictions: Path,
    teacher: Path | None = None,
    labels: Path | None = None,
    *,
    window_ms: int = 60_000,
    grace_ms: int = 600_000,
    references: dict[str, Reference] | Callable[[], dict[str, Reference]] | None = None,
    on_fallback: Callable[[str], None] | None = None,
) -> tuple[dict[WindowKey, WindowState], dict[tuple[str, str], int]]:
    """Final window states and per-(kind, reason) counters of the files.

    Parquet inputs take the columnar path (collector.columnar); when the data needs the per-record
    joiner, ``on_fallback`` hears why and the rows go through the same loop as JSONL lines.
    """
    from kdwatch.collector.columnar import analyze_parquet
    from kdwatch.collector.columns import Fallback, is_parquet

    if is_parquet(predictions):
        try:
            return analyze_parquet(predictions, teacher, labels, window_ms=window_ms, grace_ms=grace_ms,
                                   references=references)
        except Fallback as exc:
            if on_fallback is not None:
                on_fallback(str(exc))
    joiner = PartitionJoiner(window_ms, grace_ms, references() if callable(references) else references)
    windows: dict[WindowKey, WindowState] = {}
    counters: dict[tuple[str, str], int] = {}

    def collect(changes: Changes) -> None:
        for wkey, state in changes.closed.items():
            windows[wkey] = windows[wkey].merge(state) if wkey in windows else state
        for wkey, count in changes.late.items():
            windows.setdefault(wkey, WindowState()).n_late += count
        for key, count in changes.counters.items():
            counters[key] = counters.get(key, 0) + count

    # Inputs without a file have nothing to read: they never hold the watermark back.
    caught_up = {"prediction": False, "teacher": teacher is None, "label": labels is None}
    for i, (kind, raw, obj, exhausted) in enumerate(merged_events(predictions, teacher, labels), start=1):
        if raw:
            ingest(joiner, kind, raw, parsed=obj)
        if exhausted is not None:
            caught_up[exhausted] = True
        # The watermark moves after every record, windows close every BATCH records: the result does not
        # depend on BATCH (the columnar path follows the same rule).
        joiner.advance_watermark(caught_up)
        if i % BATCH == 0:
            collect(joiner.end_batch(caught_up))
    collect(joiner.end_batch(caught_up, close_all=True))
    return windows, counters
