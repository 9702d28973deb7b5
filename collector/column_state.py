"""The columnar engine's join buffer as Arrow IPC blobs: what the Kafka collector persists per commit.

A co-partition's buffer is stored incrementally (collector.live_columns): each chunk of open
predictions once as a blob (chunks grow geometrically, so a row is rewritten O(log n) times), every
join into an already stored chunk as a small patch keyed by the prediction's offset, and the replays
and labels waiting for their prediction (with what the dead-letter topic needs of them) as one blob per
model and kind. Nothing is pickled: the blobs are Arrow IPC streams, readable by any Arrow.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import numpy as np
import pyarrow as pa

from kdwatch.collector.column_join import OpenRows
from kdwatch.collector.columns import Block, objects
from kdwatch.collector.contract import Generation

_ARRAYS = ("key", "ts", "label", "latency", "audit", "mkey", "rowno", "position", "arrival_wm")
_STRINGS = ("request_id", "model", "version", "segment")
_MATRICES = ("probs", "logp")
_FEATURE = "f."


def _matrix(m: np.ndarray) -> pa.Array:
    if not m.shape[1]:  # a generative student's rows have no classes: one NaN column (no classifier has one class)
        m = np.full((m.shape[0], 1), np.nan)
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(m).ravel()), m.shape[1])


def _from_matrix(a: pa.Array) -> np.ndarray:
    width = a.type.list_size
    if width == 1:
        return np.full((len(a), 0), np.nan)
    values = a.flatten().to_numpy(zero_copy_only=False)
    return np.array(values, dtype=np.float64).reshape(len(a), width)


def _numpy(a: pa.Array) -> np.ndarray:
    return np.array(a.to_numpy(zero_copy_only=False))


_IDS, _LOGPROBS = pa.list_(pa.int64()), pa.list_(pa.float64())


def gen_columns(gen: np.ndarray, prefix: str) -> dict[str, pa.Array]:
    """Generations (object array of Generation or None) as list columns: log-probabilities and token ids."""
    items = gen.tolist()
    ids = [None if g is None else (g.top1 if g.tokens is None else g.tokens) for g in items]
    return {prefix + "logprobs": pa.array([None if g is None else g.logprobs for g in items], type=_LOGPROBS),
            prefix + "ids": pa.array(ids, type=_IDS),
            prefix + "teacher": pa.array([g is not None and g.tokens is None for g in items])}


def gen_from(columns: dict[str, pa.Array], prefix: str) -> np.ndarray | None:
    if prefix + "logprobs" not in columns:
        return None
    out = np.full(len(columns[prefix + "logprobs"]), None, dtype=object)
    for i, (logprobs, ids, teacher) in enumerate(zip(columns[prefix + "logprobs"].to_pylist(), columns[prefix + "ids"].to_pylist(),
                                                     columns[prefix + "teacher"].to_pylist(), strict=True)):
        if logprobs is not None:
            array, tokens = np.array(logprobs, dtype=np.float64), np.array(ids, dtype=np.int64)
            out[i] = Generation(array, top1=tokens) if teacher else Generation(array, tokens=tokens)
    return out


def block_columns(block: Block) -> dict[str, pa.Array]:
    columns: dict[str, pa.Array] = {}
    for f in fields(Block):
        value = getattr(block, f.name)
        if value is None or f.name == "kind":
            continue
        if f.name == "gen":
            columns.update(gen_columns(value, "g."))
        elif f.name == "prompt":
            columns["g.prompt"] = pa.array(value.tolist(), type=_IDS)
        elif f.name in _STRINGS:
            columns[f.name] = value
        elif f.name in _MATRICES:
            columns[f.name] = _matrix(value)
        elif f.name == "features":
            for name, col in value.items():
                columns[_FEATURE + name] = pa.array(col, type=pa.string() if col.dtype.kind == "O" else None)
        else:
            columns[f.name] = pa.array(value)
    return columns


def block_from(batch: pa.RecordBatch, kind: str) -> Block:
    columns = dict(zip(batch.schema.names, batch.columns, strict=True))
    values: dict[str, Any] = {"features": {}, "gen": gen_from(columns, "g.")}
    if "g.prompt" in columns:
        values["prompt"] = objects(columns["g.prompt"].to_pylist())
    for name, col in columns.items():
        if name.startswith(_FEATURE):
            array = _numpy(col)
            values["features"][name[len(_FEATURE):]] = array.astype(object) if pa.types.is_string(col.type) else array
        elif name in _STRINGS:
            values[name] = col
        elif name in _MATRICES:
            values[name] = _from_matrix(col)
        elif name in _ARRAYS:
            values[name] = _numpy(col)
    return Block(kind=kind, **values)


def to_ipc(columns: dict[str, pa.Array], meta: dict[str, str] | None = None) -> bytes:
    batch = pa.RecordBatch.from_pydict(columns)
    if meta:
        batch = batch.replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return bytes(sink.getvalue())


def from_ipc(blob: bytes) -> pa.RecordBatch:
    table = pa.ipc.open_stream(pa.py_buffer(blob)).read_all()
    return table.combine_chunks().to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], schema=table.schema)


def chunk_blob(chunk: OpenRows) -> bytes:
    columns = block_columns(chunk.preds)
    columns["o.starts"] = pa.array(chunk.starts)
    columns["o.teacher_probs"] = _matrix(chunk.teacher_probs)
    if chunk.teacher_logp is not None:
        columns["o.teacher_logp"] = _matrix(chunk.teacher_logp)
    columns["o.teacher_version"] = pa.array(chunk.teacher_version.tolist(), type=pa.string())
    columns["o.has_teacher"] = pa.array(chunk.has_teacher)
    columns["o.label_joined"] = pa.array(chunk.label_joined)
    if chunk.teacher_gen is not None:
        columns.update(gen_columns(chunk.teacher_gen, "o.g."))
    return to_ipc(columns)


def chunk_from(blob: bytes) -> OpenRows:
    batch = from_ipc(blob)
    col = {name: batch.column(name) for name in batch.schema.names}
    preds = block_from(batch, "prediction")
    logp = col.get("o.teacher_logp")
    return OpenRows(preds, _numpy(col["o.starts"]), _from_matrix(col["o.teacher_probs"]),
                    None if logp is None else _from_matrix(logp),
                    np.array(col["o.teacher_version"].to_pylist(), dtype=object), _numpy(col["o.has_teacher"]),
                    _numpy(col["o.label_joined"]), gen_from(col, "o.g."))


def patch_blob(kind: str, offsets: np.ndarray, partners: Block) -> bytes:
    """What joined stored predictions (by their offsets): a replay's distribution and version, or a label."""
    columns: dict[str, pa.Array] = {"offset": pa.array(offsets)}
    if kind == "teacher":
        assert partners.probs is not None
        columns["probs"] = _matrix(partners.probs)
        if partners.logp is not None:
            columns["logp"] = _matrix(partners.logp)
        columns["version"] = partners.version
        if partners.gen is not None:
            columns.update(gen_columns(partners.gen, "g."))
    else:
        assert partners.label is not None
        columns["label"] = pa.array(partners.label)
    return to_ipc(columns)


def apply_patch(kind: str, blob: bytes, chunks: list[OpenRows]) -> None:
    """Apply a stored join to the chunks holding its predictions (those still open)."""
    batch = from_ipc(blob)
    offsets = _numpy(batch.column("offset"))
    names = batch.schema.names
    for chunk in chunks:
        assert chunk.preds.rowno is not None
        hit = np.isin(offsets, chunk.preds.rowno)
        if not hit.any():
            continue
        rows = np.searchsorted(chunk.preds.rowno, offsets[hit])
        if kind == "teacher":
            logp = _from_matrix(batch.column("logp"))[hit] if "logp" in names else None
            versions = [v for v, h in zip(batch.column("version").to_pylist(), hit.tolist(), strict=True) if h]
            gen = gen_from(dict(zip(names, batch.columns, strict=True)), "g.")
            chunk.put_teacher(rows, _from_matrix(batch.column("probs"))[hit], logp, versions,
                              None if gen is None else gen[hit])
        else:
            chunk.label_joined[rows] = _numpy(batch.column("label"))[hit]


def early_blob(block: Block, sources: dict[int, tuple[int, bytes | None, bytes]]) -> bytes:
    """Waiting replays or labels, with each one's Kafka timestamp, key and value (for the dead-letter topic)."""
    columns = block_columns(block)
    assert block.rowno is not None
    found = [sources[int(r)] for r in block.rowno]
    columns["s.timestamp"] = pa.array([s[0] for s in found], type=pa.int64())
    columns["s.key"] = pa.array([s[1] for s in found], type=pa.binary())
    columns["s.value"] = pa.array([s[2] for s in found], type=pa.binary())
    return to_ipc(columns)


def early_from(blob: bytes, kind: str) -> tuple[Block, dict[int, tuple[int, bytes | None, bytes]]]:
    batch = from_ipc(blob)
    block = block_from(batch, kind)
    assert block.rowno is not None
    sources = dict(zip(block.rowno.tolist(), zip(batch.column("s.timestamp").to_pylist(), batch.column("s.key").to_pylist(),
                                                 batch.column("s.value").to_pylist(), strict=True), strict=True))
    return block, sources
