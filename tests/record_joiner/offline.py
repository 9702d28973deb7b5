"""`kdwatch analyze` on the record joiner: the files merged record by record (tests.record_joiner.merge) and joined
one record at a time (tests.record_joiner.join). The columnar engine is tested against it (and against tests/oracle.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson

from kdwatch.analyzer.drift import Reference
from kdwatch.analyzer.window import WindowState
from kdwatch.collector.ingest import merge_key
from kdwatch.collector.offline import Partitioner, _all_parquet
from kdwatch.collector.parquet_io import parquet_records
from kdwatch.collector.records import INPUTS, Changes, WindowKey
from tests.record_joiner.ingest import ingest
from tests.record_joiner.join import PartitionJoiner
from tests.record_joiner.merge import EventTimeMerge

# Batch size between end_batch() calls: bounds the un-aggregated contributions held at once.
BATCH = 5_000


def record_analyze(
    predictions: Path,
    teacher: Path | None = None,
    labels: Path | None = None,
    *,
    window_ms: int = 60_000,
    grace_ms: int = 600_000,
    references: dict[str, Reference] | Callable[[], dict[str, Reference]] | None = None,
    partitions: int = 1,
    partitioner: Partitioner | None = None,
) -> tuple[dict[WindowKey, WindowState], dict[tuple[str, str], int]]:
    """collector.offline.analyze_files on the record joiner."""
    refs = references() if callable(references) else references
    windows: dict[WindowKey, WindowState] = {}
    counters: dict[tuple[str, str], int] = {}
    for p in range(partitions):
        accept = None if partitions == 1 else _partition_filter(p, partitions, partitioner)
        analyze_partition(merged_events(predictions, teacher, labels, accept), window_ms, grace_ms, refs, windows, counters)
    return windows, counters


def _lines(path: Path, kind: str, order: int) -> Iterator[tuple[int, int, int, str, bytes, dict[str, Any] | None]]:
    """The merge's entries of a JSONL file: (ts, input order, line number, kind, raw line, parsed)."""
    with path.open("rb") as handle:
        for lineno, line in enumerate(handle):
            line = line.rstrip(b"\r\n")
            if line.strip():
                ts, obj = merge_key(line)
                yield (ts, order, lineno, kind, line, obj)


Stream = Iterator[tuple[int, int, int, str, bytes, dict[str, Any] | None]]



def _streams(predictions: Path, teacher: Path | None, labels: Path | None) -> dict[str, Stream]:
    """Each input's entries for the merge: JSONL lines, or Parquet rows as the objects they stand for."""
    given = {"prediction": predictions, "teacher": teacher, "label": labels}
    reader = parquet_lines if _all_parquet(predictions, teacher, labels) else _lines
    return {kind: reader(path, kind, order) for order, (kind, path) in enumerate(given.items()) if path is not None}


def merged_events(
    predictions: Path, teacher: Path | None = None, labels: Path | None = None,
    partition: Callable[[dict[str, Any] | None], bool] | None = None,
) -> Iterator[tuple[str, bytes, dict[str, Any] | None, dict[str, bool]]]:
    """(kind, raw, parsed, idle) in the merge order of collector.merge, the Kafka path's order.

    ``idle`` tells, after the record, which inputs have nothing more to read (a file at its end, or
    no file): they no longer hold the watermark back. ``partition`` keeps only the records it
    accepts (one Kafka partition's share of the files).
    """
    streams = {kind: ((key, raw, obj) for key, _order, _lineno, _kind, raw, obj in stream
                      if partition is None or partition(obj))
               for kind, stream in _streams(predictions, teacher, labels).items()}
    return merge_inputs(streams)


def merge_inputs(streams: Mapping[str, Iterable[tuple[int, bytes, dict[str, Any] | None]]]
                 ) -> Iterator[tuple[str, bytes, dict[str, Any] | None, dict[str, bool]]]:
    """(kind, raw, parsed, idle) of each input's (merge key, raw, parsed) entries, in input order, merged by event time."""
    iterators = {kind: iter(stream) for kind, stream in streams.items()}
    # Files are never late: a file at its end has nothing more to come, so an input idles at once.
    merge: EventTimeMerge[tuple[bytes, dict[str, Any] | None]] = EventTimeMerge(0.0)

    def refill(kind: str) -> None:
        entry = next(iterators[kind], None) if kind in iterators else None
        if entry is None:
            merge.set_at_end(kind, True)
            return
        key, raw, obj = entry
        merge.push(kind, key, (raw, obj))

    for kind in INPUTS:
        refill(kind)
    while (item := merge.next()) is not None:
        kind, (raw, obj) = item
        if not merge.queued(kind):
            refill(kind)
        yield kind, raw, obj, merge.idle()



def analyze_partition(events: Iterable[tuple[str, bytes, dict[str, Any] | None, dict[str, bool]]], window_ms: int,
                      grace_ms: int, refs: dict[str, Reference] | None, windows: dict[WindowKey, WindowState],
                      counters: dict[tuple[str, str], int]) -> None:
    """Join and window one co-partition's merged events (``merged_events``), adding its final windows and counters."""

    def collect(changes: Changes) -> None:
        for wkey, state in changes.closed.items():
            windows[wkey] = windows[wkey].merge(state) if wkey in windows else state
        for wkey, count in changes.late.items():
            windows.setdefault(wkey, WindowState()).n_late += count
        for key, count in changes.counters.items():
            counters[key] = counters.get(key, 0) + count

    joiner = PartitionJoiner(window_ms, grace_ms, refs)
    idle = dict.fromkeys(INPUTS, True)
    for i, (kind, raw, obj, idle) in enumerate(events, start=1):
        if raw:
            ingest(joiner, kind, raw, parsed=obj)
        # The watermark moves after every record, windows close every BATCH records: the result does not
        # depend on BATCH (the columnar path follows the same rule).
        joiner.advance_watermark(idle)
        if i % BATCH == 0:
            collect(joiner.end_batch(idle))
    collect(joiner.end_batch(idle, close_all=True))


def _partition_filter(p: int, partitions: int, partitioner: Partitioner | None) -> Callable[[dict[str, Any] | None], bool]:
    assert partitioner is not None

    def accept(obj: dict[str, Any] | None) -> bool:
        request_id = obj.get("request_id") if obj is not None else None
        if not isinstance(request_id, str):
            return p == 0
        return partitioner(request_id.encode(), partitions) == p

    return accept


def parquet_lines(path: Path, kind: str, order: int) -> Iterator[tuple[int, int, int, str, bytes, dict[str, Any] | None]]:
    """The offline merge's stream entries (see collector.offline.merged_events) for a Parquet file."""
    for rowno, obj in enumerate(parquet_records(path, kind)):
        ts = obj.get("ts")
        yield (ts if type(ts) is int else -1, order, rowno, kind, orjson.dumps(obj), obj)
