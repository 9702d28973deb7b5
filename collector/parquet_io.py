"""Parquet files in and out: batches read ahead on a worker thread, a PSI reference read from Parquet,
Parquet rows as contract records (a generative baseline's reference), and `kdwatch convert` (JSONL to Parquet).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kdwatch.analyzer.drift import CONFIDENCE, PREDICTED_CLASS, Reference, ReferenceBuilder
from kdwatch.collector.column_rules import class_counts, validate
from kdwatch.collector.columns import BATCH_ROWS, T, check_schema, distinct
from kdwatch.collector.contract import (
    MAX_VALUE_BYTES,
)
from kdwatch.errors import ContractError, SchemaError


def prefetch(batches: Iterator[T]) -> Iterator[T]:
    """The batches, each read and validated on a worker thread while the previous one is stepped.

    One batch waits at most (memory: one more batch per input); the reader's error is raised here;
    a caller that stops early stops the worker.
    """
    import queue
    import threading

    box: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def work() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        box.put(("batch", batch), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            box.put(("end", None))
        except BaseException as exc:  # handed to the reader, raised there
            box.put(("error", exc))

    thread = threading.Thread(target=work, name="kdwatch-read", daemon=True)
    thread.start()
    try:
        while True:
            what, value = box.get()
            if what == "end":
                return
            if what == "error":
                raise value
            yield value
    finally:
        stop.set()



class _Filling:
    """A float array filled batch by batch (NaN left out), without a final concatenation."""

    def __init__(self, capacity: int) -> None:
        self._array = np.empty(capacity)
        self.size = 0

    def add(self, values: np.ndarray) -> None:
        nan = np.isnan(values)
        if nan.any():
            values = values[~nan]
        self._array[self.size:self.size + values.size] = values
        self.size += values.size

    @property
    def values(self) -> np.ndarray:
        return self._array[: self.size]


def load_reference_parquet(path: Path) -> dict[str, Reference]:
    """Per-model references from a Parquet file of baseline predictions (audit rows skipped).

    An invalid row fails the load naming its row number and reason, like the JSONL reference.
    """
    file = pq.ParquetFile(path, pre_buffer=False)
    check_schema(file.schema_arrow, "prediction", path)

    def invalid(row: int, reason: str) -> Exception:
        return ContractError(reason, f"row {row}: {reason}")

    return reference_from_batches(file.iter_batches(batch_size=BATCH_ROWS), file.metadata.num_rows, invalid)


def reference_from_batches(batches: Iterable[pa.RecordBatch], capacity: int,
                           invalid: Callable[[int, str], Exception]) -> dict[str, Reference]:
    """Per-model references from record batches of baseline predictions (audit rows skipped).

    ``capacity`` bounds the row count (each model's numbers fill arrays of that size, pages touched as
    written); the first invalid row raises ``invalid(row number, reason)``.
    """
    strings: dict[str, dict[str, Counter[str]]] = {}
    row0 = 0
    numbers: dict[str, dict[str, _Filling]] = {}
    for batch in batches:
        block, reasons, _hints, _end = validate(batch, "prediction", keys=False)
        if reasons:
            # Re-validate to find the first bad row (rare: a reference is expected to be clean).
            for i in range(batch.num_rows):
                _one, bad, _h, _e = validate(batch.slice(i, 1), "prediction", keys=False)
                if bad:
                    raise invalid(row0 + i + 1, next(iter(bad)))
        row0 += batch.num_rows
        if block is None:
            continue
        assert block.audit is not None
        if block.audit.any():
            block = block.take(np.flatnonzero(block.audit == 0))
        models = distinct(block.model)
        for m in models:
            part = block if len(models) == 1 else block.take(block.rows_of(m))
            assert part.probs is not None
            nums = numbers.setdefault(m, {})
            strs = strings.setdefault(m, {})
            probs = part.probs
            if probs.size and np.isnan(probs[:, -1]).any():  # rows of fewer classes: padding never wins
                probs = probs[:, : int(class_counts(probs).max())]
                probs = np.where(np.isnan(probs), -np.inf, probs)
            predicted = np.argmax(probs, axis=1)
            nums.setdefault(CONFIDENCE, _Filling(capacity)).add(np.take_along_axis(probs, predicted[:, None], axis=1)[:, 0])
            classes = np.bincount(predicted, minlength=probs.shape[1])
            strs.setdefault(PREDICTED_CLASS, Counter()).update({str(k): int(c) for k, c in enumerate(classes) if c})
            for name, col in part.features.items():
                if col.dtype.kind == "f":
                    nums.setdefault(name, _Filling(capacity)).add(col)
                else:
                    strs.setdefault(name, Counter()).update(v for v in col.tolist() if v is not None)
    references: dict[str, Reference] = {}
    for m in numbers:
        builder = ReferenceBuilder()
        for name, filling in numbers[m].items():
            if filling.size:
                builder.numbers[name] = filling.values  # type: ignore[assignment]
        builder.strings = {name: c for name, c in strings[m].items() if c}
        references[m] = builder.build()
    return references


# ---- the vectorised join and windows ----


def parquet_records(path: Path, kind: str) -> Iterator[dict[str, Any]]:
    """Each row as the JSON object the contract describes (missing values left out)."""
    file = pq.ParquetFile(path, pre_buffer=False)
    check_schema(file.schema_arrow, kind, path)
    for batch in file.iter_batches(batch_size=BATCH_ROWS):
        if "ts" in batch.schema.names and pa.types.is_timestamp(batch.schema.field("ts").type):
            col = batch.column("ts")
            ms = pc.cast(pc.cast(col, pa.timestamp("ms", tz=col.type.tz)), pa.int64())
            batch = batch.set_column(batch.schema.get_field_index("ts"), "ts", ms)
        for row in batch.to_pylist():
            obj = {k: v for k, v in row.items() if v is not None}
            features = obj.get("features")
            if isinstance(features, dict):
                obj["features"] = {k: v for k, v in features.items() if v is not None}
            yield obj


# ---- JSONL -> Parquet ----


def columns_for(kind: str, feature_types: dict[str, str], generative: bool = False) -> pa.Schema:
    text, floats, ints = pa.string(), pa.list_(pa.float64()), pa.list_(pa.int64())
    base = [("request_id", text), ("model", text)]
    if kind == "prediction":
        fields = [*base, ("student_version", text), ("ts", pa.int64()), ("probs", floats), ("logits", floats),
                  ("generation", pa.struct([("tokens", ints), ("logprobs", floats)])),
                  ("latency_ms", pa.float64()),
                  ("features", pa.struct([(n, pa.string() if t == "str" else pa.float64()) for n, t in feature_types.items()])),
                  ("label", pa.int64()), ("audit", text), ("segment", text)]
        if not feature_types:
            fields = [f for f in fields if f[0] != "features"]
        if not generative:  # a classifier's file: no generation column (the columnar path takes it)
            fields = [f for f in fields if f[0] != "generation"]
    elif kind == "teacher":
        fields = [*base, ("teacher_version", text), ("ts", pa.int64()), ("probs", floats), ("logits", floats),
                  ("generation", pa.struct([("logprobs", floats), ("top1", ints)]))]
        if not generative:
            fields = fields[:-1]
    else:
        fields = [*base, ("label", pa.int64()), ("ts", pa.int64())]
    return pa.schema(fields)


def convert_jsonl(source: Path, target: Path, kind: str, rejected: Path | None = None) -> tuple[int, dict[str, int]]:
    """Write the valid events of a JSONL file as Parquet; invalid lines go to ``rejected`` with their reason.

    Values are written as sent (probabilities not renormalised, ts as epoch milliseconds), so
    `kdwatch analyze` gives the same windows on either file. Returns (rows written, rejects by reason).
    """
    from kdwatch.collector.contract import DECODERS, parse_ts

    decode = DECODERS[kind]
    feature_types: dict[str, str] = {}
    generative = False
    if kind in ("prediction", "teacher"):
        with source.open("rb") as handle:  # first pass: the feature columns and their types, generations or not
            for line in handle:
                try:
                    obj = orjson.loads(line)
                    features = obj.get("features")
                except (orjson.JSONDecodeError, AttributeError):
                    continue  # the second pass rejects it with its reason
                generative = generative or "generation" in obj
                if not isinstance(features, dict):
                    continue
                for name, value in features.items():
                    t = "str" if isinstance(value, str) else "num"
                    if feature_types.setdefault(name, t) != t:
                        raise SchemaError(f"feature {name!r} holds both numbers and strings: one Parquet column cannot")
    schema = columns_for(kind, dict(sorted(feature_types.items())), generative)
    reasons: Counter[str] = Counter()
    written = 0
    rows: list[dict[str, Any]] = []
    reject_handle = rejected.open("wb") if rejected is not None else None
    try:
        with source.open("rb") as handle, pq.ParquetWriter(target, schema) as writer:
            for lineno, line in enumerate(handle, start=1):
                line = line.rstrip(b"\r\n")
                if not line.strip():
                    continue
                try:
                    obj = None if len(line) > MAX_VALUE_BYTES else orjson.loads(line)
                except orjson.JSONDecodeError:
                    obj = None
                try:
                    decode(obj if isinstance(obj, dict) else line)
                except ContractError as exc:
                    reasons[exc.reason] += 1
                    if reject_handle is not None:
                        reject_handle.write(orjson.dumps({"line": lineno, "reason": exc.reason, "message": exc.message,
                                                          "value": line.decode("utf-8", "replace")}) + b"\n")
                    continue
                assert isinstance(obj, dict)
                obj["ts"] = parse_ts(obj["ts"])
                obj.pop("v", None)
                if obj.get("features") is not None:
                    obj["features"] = {k: (v if feature_types[k] == "str" else float(v)) for k, v in obj["features"].items()}
                rows.append(obj)
                if len(rows) == BATCH_ROWS:
                    writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                    written += len(rows)
                    rows = []
            if rows:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                written += len(rows)
    finally:
        if reject_handle is not None:
            reject_handle.close()
    return written, dict(reasons)
