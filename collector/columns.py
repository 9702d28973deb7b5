"""Contract events as Arrow columns: schema checks, typed column access, 64-bit join keys and row blocks.

The building blocks of the columnar path (:mod:`kdwatch.collector.columnar`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kdwatch.collector.contract import (
    AUDIT_VALUES,
    LABEL_FIELDS,
    MAX_FEATURES,
    MAX_STRING_CHARS,
    PREDICTION_FIELDS,
    TEACHER_FIELDS,
)
from kdwatch.collector.records import INPUTS
from kdwatch.errors import SchemaError

BATCH_ROWS = 65_536
T = TypeVar("T")
ORDER = {kind: i for i, kind in enumerate(INPUTS)}  # the merge's order among equal keys: collector.offline's
NEVER = -(2**62)  # a merge key or watermark before every event
FIELDS = {"prediction": PREDICTION_FIELDS, "teacher": TEACHER_FIELDS, "label": LABEL_FIELDS}
AUDIT_CODE = {AUDIT_VALUES[0]: 1, AUDIT_VALUES[1]: 2}



class InvariantError(RuntimeError):
    """A rule of the engine's own bookkeeping broke: a bug in kdwatch, never a property of the data.

    The run stops (nothing of the step is stored) with the message, to be reported with the data
    that caused it; a Kafka collector reloads the partition from its last commit and meets it again.
    """


def is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


# ---- schema and row validation ----


def check_schema(schema: pa.Schema, kind: str, path: Path) -> None:
    """Refuse columns the contract does not have, or whose type cannot hold its values."""
    allowed = FIELDS[kind]
    for f in schema:
        t = f.type
        where = f"{path.name}: column {f.name!r}"
        if f.name not in allowed:
            raise SchemaError(f"{where} is not a field of the {kind} contract (allowed: {sorted(allowed)})")
        if f.name in ("request_id", "model", "student_version", "teacher_version", "segment", "audit"):
            ok = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
        elif f.name == "ts":
            ok = pa.types.is_integer(t) or pa.types.is_timestamp(t) or pa.types.is_null(t)
        elif f.name in ("v", "label"):
            ok = pa.types.is_integer(t) or pa.types.is_null(t)
        elif f.name == "latency_ms":
            ok = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)
        elif f.name in ("probs", "logits"):
            ok = (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and (
                pa.types.is_integer(t.value_type) or pa.types.is_floating(t.value_type) or pa.types.is_null(t.value_type))
            ok = ok or pa.types.is_null(t)
        elif f.name == "features":
            ok = pa.types.is_struct(t) or pa.types.is_null(t)
            if pa.types.is_struct(t):
                if t.num_fields > MAX_FEATURES:
                    raise SchemaError(f"{where} has {t.num_fields} fields, the limit is {MAX_FEATURES}")
                for sub in t:
                    if not 0 < len(sub.name) <= MAX_STRING_CHARS or sub.name[0] == "_":
                        raise SchemaError(f"{where}: feature {sub.name[:40]!r}: names have 1..{MAX_STRING_CHARS} "
                                          "characters, not starting with _")
                    st = sub.type
                    if not (pa.types.is_integer(st) or pa.types.is_floating(st) or pa.types.is_string(st)
                            or pa.types.is_large_string(st) or pa.types.is_null(st)):
                        raise SchemaError(f"{where}: feature {sub.name!r} has type {st}; numbers or strings only")
        elif f.name == "generation":  # a generative student's: {tokens, logprobs}; its replay's: {logprobs, top1}
            ok = pa.types.is_struct(t) or pa.types.is_null(t)
        else:  # pragma: no cover - every allowed name is handled above
            ok = False
        if not ok:
            raise SchemaError(f"{where} has type {t}, which cannot hold the contract's {f.name}")


def to_numpy(arr: pa.Array) -> np.ndarray:
    """A boolean or fixed-width numeric Arrow array as a read-only numpy view (null slots: unspecified values).

    Read from the buffers: pyarrow's ``to_numpy`` converts through its pandas layer, whose first use
    imports pandas (~0.3 s of a run).
    """
    n = len(arr)
    buffer = arr.buffers()[1]
    if pa.types.is_boolean(arr.type):
        if buffer is None:
            return np.zeros(n, dtype=bool)
        bits = np.unpackbits(np.frombuffer(buffer, dtype=np.uint8), count=arr.offset + n, bitorder="little")
        return bits[arr.offset:].view(bool)
    dtype = np.dtype(arr.type.to_pandas_dtype())
    if buffer is None:
        return np.zeros(n, dtype=dtype)
    return np.frombuffer(buffer, dtype=dtype, count=n, offset=arr.offset * dtype.itemsize)


def null_mask(arr: pa.Array) -> np.ndarray:
    return np.zeros(len(arr), dtype=bool) if arr.null_count == 0 else to_numpy(arr.is_null())


def string_column(batch: pa.RecordBatch, name: str) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """(values as an Arrow string array, missing mask, length) of a string column (absent = all missing).

    Strings stay in Arrow: joins and groupings hash them there, no Python object per row.
    """
    n = batch.num_rows
    if name not in batch.schema.names or pa.types.is_null(batch.schema.field(name).type):
        return pa.nulls(n, pa.string()), np.ones(n, dtype=bool), np.zeros(n, dtype=np.int64)
    col = batch.column(name)
    if not pa.types.is_string(col.type):
        col = pc.cast(col, pa.string())
    missing = null_mask(col)
    # Byte lengths from the offsets; characters are counted only where bytes exceed the limit.
    large = pa.types.is_large_string(col.type)
    offsets = np.frombuffer(col.buffers()[1], dtype=np.int64 if large else np.int32, count=n + 1,
                            offset=col.offset * (8 if large else 4))
    length = np.diff(offsets).astype(np.int64)
    length[missing] = 0
    long = np.flatnonzero(length > MAX_STRING_CHARS)
    if long.size:
        length[long] = to_numpy(pc.utf8_length(col.take(pa.array(long))))
    return col, missing, length


def int_column(batch: pa.RecordBatch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(int64 values, 0 where missing; missing mask) of an integer column."""
    n = batch.num_rows
    if name not in batch.schema.names or pa.types.is_null(batch.schema.field(name).type):
        return np.zeros(n, dtype=np.int64), np.ones(n, dtype=bool)
    col = batch.column(name)
    if pa.types.is_timestamp(col.type):
        col = pc.cast(pc.cast(col, pa.timestamp("ms", tz=col.type.tz)), pa.int64())
    elif not pa.types.is_int64(col.type):
        col = pc.cast(col, pa.int64())
    missing = null_mask(col)
    values = to_numpy(col)
    return (np.where(missing, 0, values) if missing.any() else values), missing


def float_column(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values, NaN where missing; missing mask) of a numeric column."""
    if not pa.types.is_float64(col.type):
        col = pc.cast(col, pa.float64())
    missing = null_mask(col)
    values = to_numpy(col)
    return (np.where(missing, np.nan, values) if missing.any() else values), missing


# splitmix64's constants: a cheap mix with full avalanche.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix(h: np.ndarray) -> np.ndarray:
    h = (h ^ (h >> np.uint64(30))) * _MIX1
    h = (h ^ (h >> np.uint64(27))) * _MIX2
    return h ^ (h >> np.uint64(31))


def string_keys(values: pa.Array) -> np.ndarray:
    """A 64-bit hash of each string (null: as empty), computed on Arrow's buffers eight bytes at a time.

    Equal strings get equal keys, so joins and duplicate checks hash integers instead of strings.
    Different strings may share a key (about 1 in 10^13 for a million open requests): every match
    is confirmed by comparing the strings; a shared key is looked up again by the strings (collector.column_join).
    """
    n = len(values)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    if values.null_count:
        values = pc.fill_null(values, "")
    large = pa.types.is_large_string(values.type)
    width = 8 if large else 4
    _validity, offsets_buffer, data_buffer = values.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int64 if large else np.int32, count=n + 1,
                            offset=values.offset * width).astype(np.int64)
    first, last = int(offsets[0]), int(offsets[-1])
    data = np.zeros(last - first + 8, dtype=np.uint8)  # 8 zero bytes: the last word never reads past the end
    if last > first:
        data[: last - first] = np.frombuffer(data_buffer, dtype=np.uint8, count=last - first, offset=first)
    start = offsets[:-1] - first
    length = np.diff(offsets)
    # Every byte offset as the start of a little-endian 64-bit word (unaligned reads).
    words = np.ndarray((data.size - 7,), dtype="<u8", buffer=data, strides=(1,))
    h = length.astype(np.uint64) * _GOLDEN
    top = words.size - 1
    for at in range(0, int(length.max()), 8):
        rest = length - at
        word = words[np.minimum(start + at, top)]
        short = rest < 8
        if short.any():  # keep only the string's own bytes of its last word
            tail = (np.uint64(1) << (np.clip(rest, 0, 7).astype(np.uint64) * np.uint64(8))) - np.uint64(1)
            word &= np.where(short, tail, ~np.uint64(0))
        mixed = (h ^ word) * _MIX1
        mixed ^= mixed >> np.uint64(32)
        h = np.where(rest > 0, mixed, h) if short.any() else mixed  # a key depends on its own string only
    return _mix(h)


def is_range(idx: np.ndarray) -> bool:
    """Whether non-empty row indices are consecutive and increasing (a slice gives them without a copy)."""
    return bool(idx[-1] - idx[0] + 1 == idx.size and (idx.size < 2 or (np.diff(idx) == 1).all()))


@dataclass
class Block:
    """Validated rows of one kind, as columns (probabilities as an (n, K) matrix)."""

    kind: str
    request_id: pa.Array
    key: np.ndarray  # string_keys(request_id)
    model: pa.Array
    version: pa.Array  # student_version / teacher_version; null for labels
    ts: np.ndarray
    probs: np.ndarray | None = None  # (n, K), renormalised
    logp: np.ndarray | None = None  # (n, K): exact log-softmax where sent as logits, else NaN rows; None: no logits
    label: np.ndarray | None = None  # -1: none
    latency: np.ndarray | None = None  # NaN: none
    audit: np.ndarray | None = None  # 0 none, 1 member, 2 nonmember
    segment: pa.Array | None = None  # null: none
    features: dict[str, np.ndarray] = field(default_factory=dict)
    # A generative student's rows (collector.contract.Generation, object arrays; None in a classifier's
    # rows): its generation, or its replay's scoring of it; the prompt for the transfer set.
    gen: np.ndarray | None = None
    prompt: np.ndarray | None = None
    # Where each row stands in the merge of the inputs (see analyze_columnar): its merge key and row
    # number in its file; once stepped, its position in the merge and the watermark when it arrived.
    mkey: np.ndarray | None = None
    rowno: np.ndarray | None = None
    position: np.ndarray | None = None
    arrival_wm: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.ts.shape[0])

    def _map(self, arrow: Callable[[pa.Array], pa.Array], numpy: Callable[[np.ndarray], np.ndarray]) -> Block:
        changes: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "kind" or value is None:
                continue
            if f.name == "features":
                changes[f.name] = {name: numpy(column) for name, column in value.items()}
            else:
                changes[f.name] = arrow(value) if isinstance(value, pa.Array) else numpy(value)
        return replace(self, **changes)

    def take(self, idx: np.ndarray) -> Block:
        """The rows at ``idx`` (a contiguous range is sliced without copying)."""
        if not idx.size:
            return self.slice(0, 0)
        if is_range(idx):
            return self.slice(int(idx[0]), int(idx[-1]) + 1)
        at = pa.array(idx, type=pa.int64())
        return self._map(lambda a: a.take(at), lambda a: a[idx])

    def slice(self, begin: int, end: int) -> Block:
        """Rows ``begin:end`` as views."""
        size = max(end - begin, 0)
        return self._map(lambda a: a.slice(begin, size), lambda a: a[begin:end])

    def rows_of(self, model: str) -> np.ndarray:
        same = pc.equal(self.model, model)
        return np.flatnonzero(to_numpy(same) & ~null_mask(same))


OBJECT_FIELDS = ("gen", "prompt")


def objects(values: list[Any]) -> np.ndarray:
    """A 1-d object array of ``values`` (lists stay elements: numpy would stack them)."""
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out


def present(values: np.ndarray | None, n: int) -> np.ndarray:
    """Which rows of an object column hold a value (``values`` None: none of ``n``)."""
    if values is None:
        return np.zeros(n, dtype=bool)
    return np.fromiter((v is not None for v in values), dtype=bool, count=len(values))


def concat(blocks: list[Block]) -> Block:
    """Rows of blocks of one kind, in order (matrices NaN-padded to the widest class count)."""
    blocks = [b for b in blocks if b.n] or blocks[:1]
    if len(blocks) == 1:
        return blocks[0]

    def cat(name: str) -> Any:
        parts = [getattr(b, name) for b in blocks]
        if name in OBJECT_FIELDS and any(p is not None for p in parts):  # blocks without: None rows
            parts = [np.full(b.n, None, dtype=object) if p is None else p for p, b in zip(parts, blocks, strict=True)]
        if name == "logp" and any(p is not None for p in parts):  # blocks without logits: NaN rows
            parts = [np.full((b.n, b.probs.shape[1]), np.nan) if p is None else p  # type: ignore[union-attr]
                     for p, b in zip(parts, blocks, strict=True)]
        if any(p is None for p in parts):
            return None
        if isinstance(parts[0], pa.Array):
            return pa.concat_arrays(parts)
        if parts[0].ndim == 2:  # class-probability matrices: pad to the widest with NaN
            width = max(p.shape[1] for p in parts)
            parts = [p if p.shape[1] == width else np.pad(p, ((0, 0), (0, width - p.shape[1])), constant_values=np.nan)
                     for p in parts]
        return np.concatenate(parts)

    names = set().union(*(b.features for b in blocks))
    features = {}
    for name in names:
        parts = []
        for b in blocks:
            if name in b.features:
                parts.append(b.features[name])
            else:
                kind = next(x.features[name].dtype for x in blocks if name in x.features)
                parts.append(np.full(b.n, np.nan if kind.kind == "f" else None, dtype=kind))
        if len({part.dtype.kind for part in parts}) > 1:  # numbers in some blocks, strings in others: values as sent
            parts = [objects([None if np.isnan(v) else float(v) for v in part]) if part.dtype.kind == "f" else part
                     for part in parts]
        features[name] = np.concatenate(parts)
    changes = {f.name: cat(f.name) for f in fields(Block) if f.name not in ("kind", "features")}
    return replace(blocks[0], features=features, **changes)

def distinct(values: pa.Array) -> list[str]:
    return sorted(v for v in pc.unique(values).to_pylist() if v is not None)
