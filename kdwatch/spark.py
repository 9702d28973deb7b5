"""History on Apache Spark: `kdwatch analyze` over prediction logs too big for one process.

The same engine as `kdwatch analyze --partitions N`, distributed:

1. Each input (JSONL text or Parquet as `kdwatch convert` writes it) becomes rows of (input, row,
   partition, raw): ``row`` keeps the file's order, ``partition`` is the Kafka partition the record's
   ``request_id`` would go to (murmur2, as `analyze --partitions N` and the collector assign them).
2. ``groupBy(partition).applyInArrow``: each co-partition's records, back in file order, run through
   kdwatch's columnar engine on an executor (collector.columnar.analyze_batches: the event-time merge,
   join and windows of `kdwatch analyze`); out come the final window states, serialised with the
   database's codec, and the counters.
3. ``groupBy(model, student_version, window).applyInArrow``: the states of a window are merged
   (exactly: sums are integers, sketches merge bin by bin) and its public row computed.

So the result equals `kdwatch analyze --partitions N` on the same files, field by field. What depends
on N is what depends on it in Kafka: a record is late against its own co-partition's watermark. An
executor holds one co-partition's records at a time: choose N so that one fits (a few million records).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from kdwatch.analyzer.drift import Reference
from kdwatch.analyzer.window import WindowState, window_result
from kdwatch.collector.columnar import analyze_batches
from kdwatch.collector.consumer import kafka_partition
from kdwatch.collector.ingest import merge_key
from kdwatch.collector.jsonl_columns import chunked, jsonl_batches
from kdwatch.collector.records import INPUTS, WindowKey

STATES = "model string, student_version string, window_start long, kind string, payload string"
WINDOWS = "model string, student_version string, window_start long, state string, result string"


def session(master: str = "local[2]", app: str = "kdwatch", **conf: str) -> Any:
    """A SparkSession whose Python workers run this interpreter (kdwatch and its dependencies importable)."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    # PySpark checks the pandas version on every Arrow UDF; these exchange Arrow batches only, no pandas.
    warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas", category=FutureWarning)
    builder = SparkSession.builder.master(master).appName(app).config("spark.ui.enabled", "false")
    for key, value in {"spark.sql.shuffle.partitions": "8", "spark.sql.execution.arrow.maxRecordsPerBatch": "10000",
                       **conf}.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def _rows(spark: Any, source: Any, kind: str, partitions: int) -> Any:
    """One input as (input, row, partition, raw) rows, ``row`` in file order.

    ``source``: a JSONL path, a Parquet path, or a DataFrame with the contract's columns (a table:
    ``spark.table("logs.predictions")``, Delta or Iceberg alike), read in its own order.
    """
    from pyspark.sql import DataFrame
    from pyspark.sql import functions as F

    order = INPUTS.index(kind)
    text = str(source)
    if isinstance(source, DataFrame):
        frame = source.select(F.to_json(F.struct(*source.columns)).alias("value"))
    elif text.endswith(".parquet") or (Path(text).is_dir() and any(Path(text).glob("*.parquet"))):
        frame = spark.read.parquet(text)
        frame = frame.select(F.to_json(F.struct(*frame.columns)).alias("value"))
    else:
        frame = spark.read.text(text)
    frame = frame.withColumn("row", F.monotonically_increasing_id())

    def keyed(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            values = batch.column("value").to_pylist()
            ids = []
            for value in values:
                _ts, obj = merge_key((value or "").encode())
                request_id = obj.get("request_id") if obj is not None else None
                ids.append(kafka_partition(request_id.encode(), partitions) if isinstance(request_id, str) else 0)
            yield pa.RecordBatch.from_arrays(
                [pa.array([order] * batch.num_rows, pa.int32()), batch.column("row"), pa.array(ids, pa.int32()),
                 pa.array([(v or "").encode() for v in values], pa.binary())], names=["input", "row", "partition", "raw"])

    return frame.mapInArrow(keyed, "input int, row long, partition int, raw binary")


def _analyze_group(window_ms: int, grace_ms: int, references: dict[str, dict[str, Any]]) -> Callable[[pa.Table], pa.Table]:
    refs = {model: Reference.from_dict(data) for model, data in references.items()}

    def run(table: pa.Table) -> pa.Table:
        order = table.sort_by([("input", "ascending"), ("row", "ascending")])
        inputs = order.column("input").to_numpy()
        lines = {kind: order.column("raw").filter(pa.array(inputs == i)).to_pylist() for i, kind in enumerate(INPUTS)}
        del order, table
        # kdwatch's columnar engine, as `kdwatch analyze` runs it
        readers = {kind: jsonl_batches(chunked(raw), kind) for kind, raw in lines.items() if raw}
        windows, counters = analyze_batches(readers, window_ms=window_ms, grace_ms=grace_ms, references=refs)
        rows = [(k.model, k.student_version, k.window_start, "window", orjson.dumps(s.to_dict()).decode())
                for k, s in windows.items()]
        rows += [(kind, reason, 0, "counter", str(count)) for (kind, reason), count in counters.items()]
        return pa.Table.from_pylist([dict(zip(("model", "student_version", "window_start", "kind", "payload"), r, strict=True))
                                     for r in rows], schema=_schema(STATES))

    return run


def _merge_window(window_ms: int, references: dict[str, dict[str, Any]]) -> Callable[[pa.Table], pa.Table]:
    refs = {model: Reference.from_dict(data) for model, data in references.items()}

    def merge(table: pa.Table) -> pa.Table:
        states = [WindowState.from_dict(orjson.loads(p)) for p in table.column("payload").to_pylist()]
        state = states[0]
        for other in states[1:]:
            state.merge(other)
        model, version = table.column("model")[0].as_py(), table.column("student_version")[0].as_py()
        start = table.column("window_start")[0].as_py()
        result = window_result(model, version, start, window_ms, state, refs.get(model))
        return pa.Table.from_pylist([{"model": model, "student_version": version, "window_start": start,
                                      "state": orjson.dumps(state.to_dict()).decode(), "result": orjson.dumps(result).decode()}],
                                    schema=_schema(WINDOWS))

    return merge


def _schema(ddl: str) -> pa.Schema:
    types = {"string": pa.string(), "long": pa.int64()}
    return pa.schema([(name, types[kind]) for name, kind in (field.split() for field in ddl.split(", "))])


def analyze(spark: Any, predictions: Any, teacher: Any = None, labels: Any = None, *,
            window_ms: int = 60_000, grace_ms: int = 600_000, references: dict[str, Reference] | None = None,
            partitions: int = 8) -> tuple[Any, Any]:
    """Window rows (model, student_version, window_start, state, result: `kdwatch analyze`'s JSON) and counters.

    Each input is a JSONL or Parquet path, or a DataFrame (a table) with the contract's columns.

    Both are DataFrames; ``result`` holds exactly the fields `kdwatch analyze` prints for the window
    (``spark.read.json(windows.select("result").rdd.map(lambda r: r.result))`` gives them as columns).
    """
    if partitions < 1:
        raise ValueError("partitions must be >= 1")
    refs = {model: reference.to_dict() for model, reference in (references or {}).items()}
    frames = [_rows(spark, path, kind, partitions)
              for kind, path in zip(INPUTS, (predictions, teacher, labels), strict=True) if path is not None]
    rows = frames[0]
    for frame in frames[1:]:
        rows = rows.unionByName(frame)
    states = rows.groupBy("partition").applyInArrow(_analyze_group(window_ms, grace_ms, refs), STATES).cache()
    windows = (states.where("kind = 'window'").groupBy("model", "student_version", "window_start")
               .applyInArrow(_merge_window(window_ms, refs), WINDOWS))
    counters = (states.where("kind = 'counter'").selectExpr("model AS kind", "student_version AS reason",
                                                            "CAST(payload AS LONG) AS count")
                .groupBy("kind", "reason").sum("count").withColumnRenamed("sum(count)", "count"))
    return windows, counters


def collect(windows: Any, counters: Any) -> tuple[list[tuple[WindowKey, WindowState, dict[str, Any]]], dict[tuple[str, str], int]]:
    """The windows on the driver, in `kdwatch analyze`'s order (window start, model, version), and the counters."""
    rows = sorted(windows.collect(), key=lambda r: (r.window_start, r.model, r.student_version))
    out = [(WindowKey(r.model, r.student_version, r.window_start), WindowState.from_dict(orjson.loads(r.state)),
            orjson.loads(r.result)) for r in rows]
    return out, {(r.kind, r.reason): int(r["count"]) for r in counters.collect()}
