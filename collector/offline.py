"""The offline path: the same validation, join, windows and metrics over JSONL files.

Lines are merged by event time across the three files (as they would arrive in a stream), fed to one
:class:`PartitionJoiner`, and every window is closed at the end of input. With events no later than
the grace, the result equals the Kafka path's stored windows (tests/integration/test_streaming_equals_offline.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson

from kdwatch.analyzer.drift import Reference, ReferenceBuilder, output_features
from kdwatch.analyzer.window import WindowState
from kdwatch.collector.contract import decode_prediction
from kdwatch.collector.ingest import ingest, merge_key
from kdwatch.collector.join import PartitionJoiner
from kdwatch.collector.merge import EventTimeMerge
from kdwatch.collector.records import INPUTS, Changes, WindowKey
from kdwatch.errors import ContractError

# Batch size between end_batch() calls: bounds the un-aggregated contributions held at once.
BATCH = 5_000


def _lines(path: Path, kind: str, order: int) -> Iterator[tuple[int, int, int, str, bytes, dict[str, Any] | None]]:
    """The merge's entries of a JSONL file: (ts, input order, line number, kind, raw line, parsed)."""
    with path.open("rb") as handle:
        for lineno, line in enumerate(handle):
            line = line.rstrip(b"\r\n")
            if line.strip():
                ts, obj = merge_key(line)
                yield (ts, order, lineno, kind, line, obj)


Stream = Iterator[tuple[int, int, int, str, bytes, dict[str, Any] | None]]


def _all_parquet(*given: Path | None) -> bool:
    """Whether the inputs are Parquet (True) or JSONL (False); a mix is refused."""
    from kdwatch.collector.columns import is_parquet
    from kdwatch.errors import SchemaError

    kinds = {is_parquet(path) for path in given if path is not None}
    if len(kinds) > 1:
        raise SchemaError("--predictions, --teacher and --labels must be all JSONL or all Parquet")
    return kinds == {True}


def _streams(predictions: Path, teacher: Path | None, labels: Path | None) -> dict[str, Stream]:
    """Each input's entries for the merge: JSONL lines, or Parquet rows as the objects they stand for."""
    from kdwatch.collector.parquet_io import parquet_lines

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
        for name, value in output_features(event.dist, event.generation).items():
            builder.add(name, value)
        for name, value in (event.features or {}).items():
            builder.add(name, value)
        counts[event.model] = counts.get(event.model, 0) + 1
    return {model: (builder.build(), counts[model]) for model, builder in builders.items()}


def load_reference(path: Path) -> dict[str, Reference]:
    """Per-model references from a JSONL or Parquet file of (valid) baseline predictions."""
    import pyarrow.parquet as pq

    from kdwatch.collector.columns import is_parquet
    from kdwatch.collector.parquet_io import load_reference_parquet, parquet_records

    if is_parquet(path):
        if "generation" not in pq.read_schema(path).names:
            return load_reference_parquet(path)
        # A generative student's baseline: its rows as the contract's objects, through the same builder as JSONL.
        rows = (orjson.dumps(obj) for obj in parquet_records(path, "prediction"))
        return {model: reference for model, (reference, _n) in build_references(rows).items()}
    from kdwatch.collector.jsonl_columns import load_reference_jsonl

    columnar = load_reference_jsonl(path)
    if columnar is not None:
        return columnar
    with path.open("rb") as handle:
        return {model: reference for model, (reference, _n) in build_references(handle).items()}


Partitioner = Callable[[bytes, int], int]  # (key, partition count) -> partition, as the producers' client computes it


def analyze_files(
    predictions: Path,
    teacher: Path | None = None,
    labels: Path | None = None,
    *,
    window_ms: int = 60_000,
    grace_ms: int = 600_000,
    references: dict[str, Reference] | Callable[[], dict[str, Reference]] | None = None,
    on_fallback: Callable[[str], None] | None = None,
    partitions: int = 1,
    partitioner: Partitioner | None = None,
    columnar: bool = True,
) -> tuple[dict[WindowKey, WindowState], dict[tuple[str, str], int]]:
    """Final window states and per-(kind, reason) counters of the files.

    JSONL and Parquet inputs take the columnar path (collector.columnar); when the data needs the
    per-record joiner, ``on_fallback`` hears why and the records go through it (collector.join), as
    they do with ``columnar=False`` (the reference the columnar path is tested against).

    ``partitions`` > 1 reproduces a topic's layout: each record goes to the partition ``partitioner``
    gives its ``request_id`` (the Kafka key), each partition is merged and joined on its own, as a
    collector does, and the windows are merged. A record without a readable ``request_id`` changes
    only counters and goes to partition 0. On the columnar engine the files are split by partition
    first (``split_by_partition``).
    """
    from kdwatch.collector.columnar import analyze_columnar
    from kdwatch.collector.columns import Fallback

    if partitions < 1 or (partitions > 1 and partitioner is None):
        raise ValueError("partitions must be >= 1, and a partitioner is needed for more than one")
    _all_parquet(predictions, teacher, labels)  # refuses a mix before any work (the partitions' split included)
    if partitions > 1 and columnar:
        assert partitioner is not None
        return _analyze_partitions(predictions, teacher, labels, window_ms, grace_ms, references, on_fallback,
                                   partitions, partitioner)
    if partitions == 1 and columnar:
        try:
            return analyze_columnar(predictions, teacher, labels, window_ms=window_ms, grace_ms=grace_ms,
                                    references=references)
        except Fallback as exc:
            if on_fallback is not None:
                on_fallback(str(exc))
    refs = references() if callable(references) else references
    windows: dict[WindowKey, WindowState] = {}
    counters: dict[tuple[str, str], int] = {}
    for p in range(partitions):
        accept = None if partitions == 1 else _partition_filter(p, partitions, partitioner)
        analyze_partition(merged_events(predictions, teacher, labels, accept), window_ms, grace_ms, refs, windows, counters)
    return windows, counters


def _analyze_partitions(predictions: Path, teacher: Path | None, labels: Path | None, window_ms: int, grace_ms: int,
                        references: dict[str, Reference] | Callable[[], dict[str, Reference]] | None,
                        on_fallback: Callable[[str], None] | None, partitions: int, partitioner: Partitioner
                        ) -> tuple[dict[WindowKey, WindowState], dict[tuple[str, str], int]]:
    """``analyze_files`` with ``partitions`` > 1 on the columnar engine: the files are split by partition first (one
    pass, to a temporary directory: memory stays flat), then each co-partition runs on its own, as a collector's."""
    import tempfile

    refs = references() if callable(references) else references
    windows: dict[WindowKey, WindowState] = {}
    counters: dict[tuple[str, str], int] = {}
    with tempfile.TemporaryDirectory(prefix="kdwatch-partitions-") as directory:
        parts = split_by_partition({"prediction": predictions, "teacher": teacher, "label": labels}, partitions,
                                   partitioner, Path(directory))
        for part in parts:
            got = analyze_files(part["prediction"], part["teacher"], part["label"], window_ms=window_ms,
                                grace_ms=grace_ms, references=refs, on_fallback=on_fallback)
            for key, state in got[0].items():
                windows[key] = windows[key].merge(state) if key in windows else state
            for counter, count in got[1].items():
                counters[counter] = counters.get(counter, 0) + count
    return windows, counters


def split_by_partition(paths: dict[str, Path | None], partitions: int, partitioner: Partitioner, directory: Path
                       ) -> list[dict[str, Any]]:
    """Each input's records in one file per partition of their ``request_id`` (the Kafka key), in file order.

    A record without a readable string ``request_id`` goes to partition 0 (as the record path sends it).
    """
    from kdwatch.collector.columns import is_parquet

    out: list[dict[str, Any]] = [dict.fromkeys(paths) for _ in range(partitions)]
    for kind, path in paths.items():
        if path is None:
            continue
        targets = [directory / f"{kind}-{p}{path.suffix}" for p in range(partitions)]
        for p, target in enumerate(targets):
            out[p][kind] = target
        (_split_parquet if is_parquet(path) else _split_jsonl)(path, targets, partitioner)
    return out


def _partition_of(request_id: Any, partitions: int, partitioner: Partitioner) -> int:
    return partitioner(request_id.encode(), partitions) if isinstance(request_id, str) else 0


def _split_jsonl(path: Path, targets: list[Path], partitioner: Partitioner) -> None:
    handles = [target.open("wb") for target in targets]
    try:
        with path.open("rb") as source:
            for line in source:
                line = line.rstrip(b"\r\n")
                if not line.strip():
                    continue
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    obj = None
                request_id = obj.get("request_id") if isinstance(obj, dict) else None
                handles[_partition_of(request_id, len(targets), partitioner)].write(line + b"\n")
    finally:
        for handle in handles:
            handle.close()


def _split_parquet(path: Path, targets: list[Path], partitioner: Partitioner) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = pq.ParquetFile(path)
    writers = [pq.ParquetWriter(target, source.schema_arrow) for target in targets]
    try:
        for batch in source.iter_batches():
            if "request_id" in batch.schema.names:
                ids = batch.column("request_id").to_pylist()
                where = np.fromiter((_partition_of(r, len(targets), partitioner) for r in ids), dtype=np.int64, count=len(ids))
            else:
                where = np.zeros(batch.num_rows, dtype=np.int64)
            for p, writer in enumerate(writers):
                writer.write_batch(batch.filter(pa.array(where == p)))
    finally:
        for writer in writers:
            writer.close()


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
