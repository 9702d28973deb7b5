"""The offline path: `kdwatch analyze` on JSONL or Parquet files, and the references drift is measured against.

The files run through the columnar engine (collector.columnar), merged by event time as a Kafka
co-partition's records are (collector.merge); every window is closed at the end of input. The Kafka
collector runs the same engine, so its stored windows equal these on the same events
(tests/integration/test_live_equivalence.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson

from kdwatch.analyzer.drift import Reference, ReferenceBuilder, output_features
from kdwatch.analyzer.window import WindowState
from kdwatch.collector.contract import decode_prediction
from kdwatch.collector.records import WindowKey
from kdwatch.errors import ContractError


def _all_parquet(*given: Path | None) -> bool:
    """Whether the inputs are Parquet (True) or JSONL (False); a mix is refused."""
    from kdwatch.collector.columns import is_parquet
    from kdwatch.errors import SchemaError

    kinds = {is_parquet(path) for path in given if path is not None}
    if len(kinds) > 1:
        raise SchemaError("--predictions, --teacher and --labels must be all JSONL or all Parquet")
    return kinds == {True}


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
    partitions: int = 1,
    partitioner: Partitioner | None = None,
) -> tuple[dict[WindowKey, WindowState], dict[tuple[str, str], int]]:
    """Final window states and per-(kind, reason) counters of the files, on the columnar engine (collector.columnar).

    ``partitions`` > 1 reproduces a topic's layout: each record goes to the partition ``partitioner``
    gives its ``request_id`` (the Kafka key), each partition is merged and joined on its own, as a
    collector does, and the windows are merged. A record without a readable ``request_id`` changes
    only counters and goes to partition 0. The files are split by partition first (``split_by_partition``).
    """
    from kdwatch.collector.columnar import analyze_columnar

    if partitions < 1 or (partitions > 1 and partitioner is None):
        raise ValueError("partitions must be >= 1, and a partitioner is needed for more than one")
    _all_parquet(predictions, teacher, labels)  # refuses a mix before any work (the partitions' split included)
    if partitions > 1:
        assert partitioner is not None
        return _analyze_partitions(predictions, teacher, labels, window_ms, grace_ms, references, partitions, partitioner)
    return analyze_columnar(predictions, teacher, labels, window_ms=window_ms, grace_ms=grace_ms, references=references)


def _analyze_partitions(predictions: Path, teacher: Path | None, labels: Path | None, window_ms: int, grace_ms: int,
                        references: dict[str, Reference] | Callable[[], dict[str, Reference]] | None,
                        partitions: int, partitioner: Partitioner
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
                                grace_ms=grace_ms, references=refs)
            for key, state in got[0].items():
                windows[key] = windows[key].merge(state) if key in windows else state
            for counter, count in got[1].items():
                counters[counter] = counters.get(counter, 0) + count
    return windows, counters


def split_by_partition(paths: dict[str, Path | None], partitions: int, partitioner: Partitioner, directory: Path
                       ) -> list[dict[str, Any]]:
    """Each input's records in one file per partition of their ``request_id`` (the Kafka key), in file order.

    A record without a readable string ``request_id`` goes to partition 0 (it changes only counters: any
    partition would give the same result).
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
