"""The columnar offline path: `kdwatch analyze` over Parquet files, validated and computed on columns.

The files hold the event contract as columns (README, "Parquet input"): one row per event, the
contract's field names as column names, ``ts`` as int64 epoch milliseconds or an Arrow timestamp,
``probs`` / ``logits`` as lists of numbers, ``features`` as a struct of numeric or string fields.
A column the contract does not know, or of a type it cannot hold, fails the whole file at once,
naming the column.

Rows are validated with the same rules, in the same order and with the same reason codes as
:mod:`collector.contract`, but over whole columns. The three files are then read in the order the
record path merges them (by event time; a file out of order as a heap merge reads it, i.e. by the
file's running maximum of ``ts``), a stretch at a time, and each record arrives with the watermark
it would see there. The rules are the stream joiner's (collector.join), with the watermark moving
after every record as on the record path offline: the least newest event time of the inputs still
being read; a window closes at ``start + size + grace``; a replay or label joins its prediction when
both arrive before the prediction's window closes (one that comes first waits while its own window
is open); predictions of closed windows are late; replays or labels left without a prediction when
their own window closes are unmatched. So the result depends on the events and their order in each
file, not on batch sizes. Joins look up 64-bit hashes of ``request_id`` (each match confirmed on the
strings); each window's state is computed once, when the watermark closes it. Memory: about one
batch per input plus the open windows.

What the vectorised join does not model, it hands back: a ``request_id`` seen twice in the same
input while the first is still open (a duplicate), a model whose events have different class counts
(different models may), a label record for an audit prediction or for a prediction that carried its own label,
more than :data:`analyzer.window.MAX_SEGMENTS` segments in a window. Then the run restarts on the
per-record path (the same decoder and joiner as JSONL and Kafka) and says why on stderr, so the
result is always the stream joiner's.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from itertools import pairwise
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kdwatch.analyzer.drift import CONFIDENCE, PREDICTED_CLASS, Reference, ReferenceBuilder
from kdwatch.analyzer.fidelity import STUDENT_PROB_FLOOR
from kdwatch.analyzer.membership import attack_scores
from kdwatch.analyzer.window import MAX_SEGMENTS, WindowState
from kdwatch.collector.contract import (
    AUDIT_VALUES,
    LABEL_FIELDS,
    MAX_CLASSES,
    MAX_FEATURES,
    MAX_STRING_CHARS,
    MAX_TS_MS,
    MAX_VALUE_BYTES,
    MIN_TS_MS,
    PREDICTION_FIELDS,
    PROB_SUM_TOLERANCE,
    TEACHER_FIELDS,
)
from kdwatch.collector.join import INPUTS, NO_SEGMENT, WindowKey
from kdwatch.errors import ContractError, SchemaError

BATCH_ROWS = 65_536
T = TypeVar("T")
ORDER = {kind: i for i, kind in enumerate(INPUTS)}  # the merge's order among equal keys: collector.offline's
NEVER = -(2**62)  # a merge key or watermark before every event
FIELDS = {"prediction": PREDICTION_FIELDS, "teacher": TEACHER_FIELDS, "label": LABEL_FIELDS}
AUDIT_CODE = {AUDIT_VALUES[0]: 1, AUDIT_VALUES[1]: 2}


class Fallback(Exception):
    """The data needs the per-record joiner (see the module docstring); the message says why."""


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
        else:  # pragma: no cover - every allowed name is handled above
            ok = False
        if not ok:
            raise SchemaError(f"{where} has type {t}, which cannot hold the contract's {f.name}")


def _np(arr: pa.Array) -> np.ndarray:
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


def _missing(arr: pa.Array) -> np.ndarray:
    return np.zeros(len(arr), dtype=bool) if arr.null_count == 0 else _np(arr.is_null())


def _strings(batch: pa.RecordBatch, name: str) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """(values as an Arrow string array, missing mask, length) of a string column (absent = all missing).

    Strings stay in Arrow: joins and groupings hash them there, no Python object per row.
    """
    n = batch.num_rows
    if name not in batch.schema.names or pa.types.is_null(batch.schema.field(name).type):
        return pa.nulls(n, pa.string()), np.ones(n, dtype=bool), np.zeros(n, dtype=np.int64)
    col = batch.column(name)
    if not pa.types.is_string(col.type):
        col = pc.cast(col, pa.string())
    missing = _missing(col)
    # Byte lengths from the offsets; characters are counted only where bytes exceed the limit.
    large = pa.types.is_large_string(col.type)
    offsets = np.frombuffer(col.buffers()[1], dtype=np.int64 if large else np.int32, count=n + 1,
                            offset=col.offset * (8 if large else 4))
    length = np.diff(offsets).astype(np.int64)
    length[missing] = 0
    long = np.flatnonzero(length > MAX_STRING_CHARS)
    if long.size:
        length[long] = _np(pc.utf8_length(col.take(pa.array(long))))
    return col, missing, length


def _ints(batch: pa.RecordBatch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(int64 values, 0 where missing; missing mask) of an integer column."""
    n = batch.num_rows
    if name not in batch.schema.names or pa.types.is_null(batch.schema.field(name).type):
        return np.zeros(n, dtype=np.int64), np.ones(n, dtype=bool)
    col = batch.column(name)
    if pa.types.is_timestamp(col.type):
        col = pc.cast(pc.cast(col, pa.timestamp("ms", tz=col.type.tz)), pa.int64())
    elif not pa.types.is_int64(col.type):
        col = pc.cast(col, pa.int64())
    missing = _missing(col)
    values = _np(col)
    return (np.where(missing, 0, values) if missing.any() else values), missing


def _floats(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values, NaN where missing; missing mask) of a numeric column."""
    if not pa.types.is_float64(col.type):
        col = pc.cast(col, pa.float64())
    missing = _missing(col)
    values = _np(col)
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
    is confirmed by comparing the strings, and a collision sends the run to the record joiner.
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


def _is_range(idx: np.ndarray) -> bool:
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
    # Where each row stands in the merge of the inputs (see analyze_parquet): its merge key and row
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
        if _is_range(idx):
            return self.slice(int(idx[0]), int(idx[-1]) + 1)
        at = pa.array(idx, type=pa.int64())
        return self._map(lambda a: a.take(at), lambda a: a[idx])

    def slice(self, begin: int, end: int) -> Block:
        """Rows ``begin:end`` as views."""
        size = max(end - begin, 0)
        return self._map(lambda a: a.slice(begin, size), lambda a: a[begin:end])

    def rows_of(self, model: str) -> np.ndarray:
        same = pc.equal(self.model, model)
        return np.flatnonzero(_np(same) & ~_missing(same))


def concat(blocks: list[Block]) -> Block:
    """Rows of blocks of one kind and class count, in order."""
    blocks = [b for b in blocks if b.n] or blocks[:1]
    if len(blocks) == 1:
        return blocks[0]

    def cat(name: str) -> Any:
        parts = [getattr(b, name) for b in blocks]
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
        features[name] = np.concatenate(parts)
    changes = {f.name: cat(f.name) for f in fields(Block) if f.name not in ("kind", "features")}
    return replace(blocks[0], features=features, **changes)


class Rejections:
    """The first failing rule of each row, in the decoder's order (0: none yet)."""

    def __init__(self, n: int) -> None:
        self.code = np.zeros(n, dtype=np.int16)
        self.reasons: list[str] = [""]

    def flag(self, mask: np.ndarray, reason: str) -> None:
        fresh = mask & (self.code == 0)
        if fresh.any():
            if reason not in self.reasons:
                self.reasons.append(reason)
            self.code[fresh] = self.reasons.index(reason)

    @property
    def ok(self) -> np.ndarray:
        return self.code == 0

    def counts(self) -> dict[str, int]:
        found = np.bincount(self.code, minlength=len(self.reasons))
        return {self.reasons[i]: int(c) for i, c in enumerate(found) if i and c}


def _check_string(rej: Rejections, values: tuple[np.ndarray, np.ndarray, np.ndarray], required: bool) -> None:
    _v, missing, length = values
    if required:
        rej.flag(missing, "missing_field")
    rej.flag(~missing & (length == 0), "empty_string")
    rej.flag(~missing & (length > MAX_STRING_CHARS), "string_too_long")


def _distribution(batch: pa.RecordBatch, rej: Rejections) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Validated (probs, logp) as (n, K_max) matrices, NaN beyond each row's class count; None when no row is valid.

    ``logp`` is None when no row sent logits. Rows are checked and normalised in groups of equal
    class count, so each row's arithmetic is the decoder's (summing a padded row would group the
    additions differently). The usual batch (one class count, all probabilities or all logits, no
    nulls) is computed on the decoded values in place, without copies.
    """
    n = batch.num_rows
    names = batch.schema.names

    def column(name: str) -> pa.Array | None:
        if name not in names or pa.types.is_null(batch.schema.field(name).type):
            return None
        return batch.column(name)

    probs_col, logits_col = column("probs"), column("logits")
    has_p = np.zeros(n, bool) if probs_col is None else ~_missing(probs_col)
    has_l = np.zeros(n, bool) if logits_col is None else ~_missing(logits_col)
    rej.flag(has_p == has_l, "probs_or_logits")
    lengths = np.zeros(n, dtype=np.int64)
    for col, has in ((probs_col, has_p), (logits_col, has_l)):
        if col is not None and has.any():
            lengths = np.where(has, _np(pc.list_value_length(col)), lengths)  # null slots: masked by has
    rej.flag(~((lengths >= 2) & (lengths <= MAX_CLASSES)), "bad_class_count")
    ok = rej.ok
    if not ok.any():
        return None, None
    ks = np.unique(lengths[ok])
    width = int(ks.max())
    probs: np.ndarray | None = None
    logp: np.ndarray | None = None

    def put(target: np.ndarray | None, rows: np.ndarray, k: int, values: np.ndarray) -> np.ndarray:
        """``values`` written into ``rows`` of an (n, width) NaN matrix (created when first needed)."""
        if target is None:
            if k == width and values.shape[0] == n:
                return values
            target = np.full((n, width), np.nan)
        target[rows, :k] = values if values.shape[0] == int(rows.sum()) else values[rows]
        return target

    for k in ks.tolist():
        group = rej.ok & (lengths == k)
        whole = bool(group.all())
        matrix = None if whole else np.full((n, k), np.nan)
        logits_rows = np.zeros(n, bool)
        for col, has, is_logits in ((probs_col, has_p, False), (logits_col, has_l, True)):
            rows = group & has
            if col is None or not rows.any():
                continue
            every = bool(rows.all())
            flat = pc.list_flatten(col if every else col.filter(pa.array(rows)))
            if not pa.types.is_float64(flat.type):
                flat = pc.cast(flat, pa.float64())
            if flat.null_count:
                wrong = np.zeros(n, bool)
                wrong[rows] = _np(pc.is_null(flat)).reshape(-1, k).any(axis=1)
                rej.flag(wrong, "wrong_type")
                flat = pc.fill_null(flat, np.nan)
            values = _np(flat).reshape(-1, k)
            if every:
                matrix = values
            else:
                if matrix is None:
                    matrix = np.full((n, k), np.nan)
                matrix[rows] = values
            if is_logits:
                logits_rows |= rows
        assert matrix is not None
        finite = np.isfinite(matrix).all(axis=1)
        rej.flag(group & rej.ok & ~finite, "not_finite")
        prob_rows = group & rej.ok & has_p
        if prob_rows.any():
            negative = (matrix < 0).any(axis=1)  # NaN compares False; non-finite rows are rejected already
            rej.flag(prob_rows & negative, "negative_probability")
            prob_rows = group & rej.ok & has_p
            totals = matrix.sum(axis=1)
            rej.flag(prob_rows & (np.abs(totals - 1.0) > PROB_SUM_TOLERANCE), "probs_not_normalised")
            prob_rows = group & rej.ok & has_p
            if prob_rows.all():
                probs = put(probs, prob_rows, k, matrix / totals[:, None])
            elif prob_rows.any():
                probs = put(probs, prob_rows, k, matrix[prob_rows] / totals[prob_rows, None])
        lrows = group & rej.ok & logits_rows
        if lrows.any():
            logits = matrix if lrows.all() else matrix[lrows]
            shifted = logits - logits.max(axis=1, keepdims=True)
            log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
            logp = put(logp, lrows, k, log_probs)
            probs = put(probs, lrows, k, np.exp(log_probs))
    if probs is None:  # every row failed a check after the class count
        probs = np.full((n, width), np.nan)
    return probs, logp


def _class_counts(probs: np.ndarray) -> np.ndarray:
    """Each row's class count (its probabilities are NaN beyond it)."""
    return (~np.isnan(probs)).sum(axis=1)


def trim(block: Block) -> Block:
    """The block with its matrices cut to its single class count (several: Fallback)."""
    if block.probs is None or not block.n or not np.isnan(block.probs[:, -1]).any():
        return block  # every row fills the widest class count
    ks = np.unique(_class_counts(block.probs))
    if ks.size > 1:
        raise Fallback(f"model {block.model[0].as_py()!r} has events with {ks[:5].tolist()} classes")
    k = int(ks[0])
    if k == block.probs.shape[1]:
        return block
    return replace(block, probs=block.probs[:, :k], logp=None if block.logp is None else block.logp[:, :k])


def _features(batch: pa.RecordBatch, rej: Rejections) -> dict[str, np.ndarray]:
    """Feature columns: float64 (NaN: missing) or object (None: missing)."""
    if "features" not in batch.schema.names or pa.types.is_null(batch.schema.field("features").type):
        return {}
    col = batch.column("features")
    outer_missing = _missing(col)
    out: dict[str, np.ndarray] = {}
    for i, sub in enumerate(col.type):
        child = pc.struct_field(col, [i])
        st = sub.type
        if pa.types.is_null(st):
            continue
        if pa.types.is_string(st) or pa.types.is_large_string(st):
            missing = _missing(child) | outer_missing
            values = np.array(child.to_pylist(), dtype=object)
            length = _np(pc.fill_null(pc.utf8_length(child), 0))
            rej.flag(~missing & (length > MAX_STRING_CHARS), "string_too_long")
            values[missing] = None
        else:
            values, missing = _floats(child)
            if outer_missing.any():
                missing = missing | outer_missing
                values = np.where(outer_missing, np.nan, values)
            rej.flag(~missing & ~np.isfinite(values), "not_finite")
        out[sub.name] = values
    return out


# A rejected prediction that names its window: model, student_version, ts, merge key, row number.
Hint = tuple[str, str, int, int, int]


def validate(batch: pa.RecordBatch, kind: str, keys: bool = True, row0: int = 0,
             key0: int = -1) -> tuple[Block | None, dict[str, int], list[Hint], int]:
    """(valid rows, rejected count per reason, rejected predictions naming a window, merge key after the batch).

    ``keys=False`` leaves the join keys out (zeros): a reference is never joined. ``row0`` is the
    batch's first row number in its file and ``key0`` the merge key before it: the merge of the
    inputs orders rows by their file's running maximum of ``ts`` (an unreadable ``ts`` counts as -1),
    which is exactly the order in which the record path's heap merge reads them.

    The window hint mirrors collector.ingest: a rejected prediction whose model, student_version and
    ts are readable is counted in that window's ``n_rejected``. The caller knows the window size, so
    the keys here hold the event time itself in the window_start place.
    """
    n = batch.num_rows
    rej = Rejections(n)
    v, v_missing = _ints(batch, "v")
    rej.flag(~v_missing & (v != 1), "unsupported_version")
    request_id = _strings(batch, "request_id")
    model = _strings(batch, "model")
    version_name = {"prediction": "student_version", "teacher": "teacher_version", "label": None}[kind]
    version = _strings(batch, version_name) if version_name else None
    ts, ts_missing = _ints(batch, "ts")
    ts_ok = ~ts_missing & (ts >= MIN_TS_MS) & (ts < MAX_TS_MS)
    _check_string(rej, request_id, True)
    _check_string(rej, model, True)
    label, label_missing = _ints(batch, "label")
    if kind == "label":
        rej.flag(label_missing, "missing_field")
        rej.flag(~label_missing & ((label < 0) | (label >= MAX_CLASSES)), "label_out_of_range")
    if version is not None:
        _check_string(rej, version, True)
    rej.flag(ts_missing, "missing_field")
    rej.flag(~ts_missing & ~ts_ok, "timestamp_out_of_range")
    probs = logp = None
    latency = audit = segment = None
    features: dict[str, np.ndarray] = {}
    if kind != "label":
        probs, logp = _distribution(batch, rej)
    if kind == "prediction":
        if "latency_ms" in batch.schema.names and not pa.types.is_null(batch.schema.field("latency_ms").type):
            latency, lat_missing = _floats(batch.column("latency_ms"))
            rej.flag(~lat_missing & (~np.isfinite(latency) | (latency < 0)), "bad_latency")
        else:
            latency = np.full(n, np.nan)
        rej.flag(~label_missing & ((label < 0) | (label >= MAX_CLASSES)), "label_out_of_range")
        if probs is not None and not label_missing.all():
            rej.flag(~label_missing & (label >= _class_counts(probs)), "label_out_of_range")
        audit_values, audit_missing, _len = _strings(batch, "audit")
        audit = np.zeros(n, dtype=np.int8)
        for text, code in AUDIT_CODE.items():
            audit[_np(pc.equal(audit_values, text)) & ~audit_missing] = code
        rej.flag(~audit_missing & (audit == 0), "bad_audit")
        rej.flag((audit > 0) & label_missing, "missing_field")
        features = _features(batch, rej)
        seg = _strings(batch, "segment")
        _check_string(rej, seg, False)
        segment = seg[0]
    ok = rej.ok
    reasons = rej.counts()
    mkey = np.maximum(np.maximum.accumulate(np.where(ts_missing, -1, ts)), key0) if n else np.zeros(0, np.int64)
    rowno = row0 + np.arange(n, dtype=np.int64)
    end_key = int(mkey[-1]) if n else key0
    hints: list[Hint] = []
    if kind == "prediction" and not ok.all():
        assert version is not None
        readable = ~ok & ts_ok
        for f in (model, version):
            readable &= ~f[1] & (f[2] > 0) & (f[2] <= MAX_STRING_CHARS)
        at = pa.array(np.flatnonzero(readable), type=pa.int64())
        hints = list(zip(model[0].take(at).to_pylist(), version[0].take(at).to_pylist(), ts[readable].tolist(),
                         mkey[readable].tolist(), rowno[readable].tolist(), strict=True))
    if not ok.any():
        return None, dict(reasons), hints, end_key
    block = Block(
        kind, request_id[0], np.zeros(n, dtype=np.uint64), model[0],
        version[0] if version is not None else pa.nulls(n, pa.string()), ts, probs, logp,
        np.where(label_missing, -1, label), latency, audit, segment, features, mkey=mkey, rowno=rowno)
    if not ok.all():
        block = block.take(np.flatnonzero(ok))
    if keys:
        block.key = string_keys(block.request_id)
    return block, dict(reasons), hints, end_key


@dataclass
class Batch:
    """One validated batch of a file, and where it ends in the merge of the inputs."""

    block: Block | None
    reasons: dict[str, int]
    hints: list[Hint]
    end_key: int  # merge key after its last row
    last_row: int  # row number of its last row
    final: bool  # the file's last batch


def read_blocks(path: Path, kind: str) -> Iterator[Batch]:
    """Validated batches of a Parquet file of ``kind`` events (the schema is checked first).

    Files are opened with ``pre_buffer=False``: with pre-buffering, ``iter_batches`` keeps every
    column chunk it has read until the end of the file (~10 MB per 65,536 predictions here), so
    memory grew with the file instead of staying at one batch.
    """
    try:
        file = pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SchemaError(f"{path.name}: not a readable Parquet file: {exc}") from None
    check_schema(file.schema_arrow, kind, path)
    total = file.metadata.num_rows
    row0, key = 0, -1
    for batch in file.iter_batches(batch_size=BATCH_ROWS):
        block, reasons, hints, key = validate(batch, kind, row0=row0, key0=key)
        row0 += batch.num_rows
        yield Batch(block, reasons, hints, key, row0 - 1, row0 == total)


# ---- references ----


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
    strings: dict[str, dict[str, Counter[str]]] = {}
    row0 = 0
    file = pq.ParquetFile(path, pre_buffer=False)
    check_schema(file.schema_arrow, "prediction", path)
    numbers: dict[str, dict[str, _Filling]] = {}
    capacity = file.metadata.num_rows  # each model's numbers fill arrays of this size (pages touched as written)
    for batch in file.iter_batches(batch_size=BATCH_ROWS):
        block, reasons, _hints, _end = validate(batch, "prediction", keys=False)
        if reasons:
            # Re-validate to find the first bad row (rare: a reference is expected to be clean).
            for i in range(batch.num_rows):
                _one, bad, _h, _e = validate(batch.slice(i, 1), "prediction", keys=False)
                if bad:
                    reason = next(iter(bad))
                    raise ContractError(reason, f"row {row0 + i + 1}: {reason}")
        row0 += batch.num_rows
        if block is None:
            continue
        assert block.audit is not None
        if block.audit.any():
            block = block.take(np.flatnonzero(block.audit == 0))
        models = _distinct(block.model)
        for m in models:
            part = block if len(models) == 1 else block.take(block.rows_of(m))
            assert part.probs is not None
            nums = numbers.setdefault(m, {})
            strs = strings.setdefault(m, {})
            probs = part.probs
            if probs.size and np.isnan(probs[:, -1]).any():  # rows of fewer classes: padding never wins
                probs = probs[:, : int(_class_counts(probs).max())]
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


@dataclass(frozen=True)
class _KeyIndex:
    """A hash table of join keys, built once per chunk, so later steps' replays and labels find their rows.

    pandas' Index keeps its hash table once built (the lookups of 65,536 keys: ~1 ms; pyarrow's
    index_in rebuilds its table on every call, numpy's searchsorted misses the cache).
    """

    index: pd.Index

    @classmethod
    def of(cls, keys: np.ndarray) -> _KeyIndex:
        return cls(pd.Index(keys))  # unique: a chunk's keys were checked for duplicates

    def find(self, keys: np.ndarray, offset: int, n: int) -> np.ndarray:
        """Row (minus ``offset``) of each key among rows ``offset .. offset + n`` of the indexed ones; -1: absent."""
        if not keys.size:
            return np.full(0, -1, dtype=np.int64)
        rows = self.index.get_indexer(keys).astype(np.int64)
        local = rows - offset
        return np.where((rows >= 0) & (local >= 0) & (local < n), local, -1)


@dataclass
class _Open:
    """Predictions of one model not yet closed, with what has joined them, row for row."""

    preds: Block
    starts: np.ndarray  # each row's window start
    teacher_probs: np.ndarray  # (n, K); NaN rows: no replay yet
    teacher_logp: np.ndarray | None  # (n, K) log-softmax of replays sent as logits (NaN rows otherwise); None: none were
    teacher_version: np.ndarray  # object; None: no replay
    has_teacher: np.ndarray
    label_joined: np.ndarray  # a label that came as its own record (-1: none)
    # The key index of the rows this chunk was sliced from, and where it starts in them (built when first used).
    index: _KeyIndex | None = None
    index_offset: int = 0

    def find(self, values: Block) -> np.ndarray:
        """This chunk's row of each request_id of ``values`` (-1: none); matches confirmed on the strings."""
        if self.index is None:
            self.index, self.index_offset = _KeyIndex.of(self.preds.key), 0
        at = self.index.find(values.key, self.index_offset, self.n)
        _confirm(values, self.preds, at)
        return at

    @classmethod
    def new(cls, preds: Block, starts: np.ndarray, k: int) -> _Open:
        n = preds.n
        return cls(preds, starts, np.full((n, k), np.nan), None, np.full(n, None, dtype=object),
                   np.zeros(n, dtype=bool), np.full(n, -1, dtype=np.int64))

    @property
    def n(self) -> int:
        return self.preds.n

    def set_teacher(self, rows: np.ndarray, teacher: Block) -> None:
        assert teacher.probs is not None
        self.teacher_probs[rows] = teacher.probs
        if teacher.logp is not None:
            if self.teacher_logp is None:
                self.teacher_logp = np.full(self.teacher_probs.shape, np.nan)
            self.teacher_logp[rows] = teacher.logp
        self.teacher_version[rows] = np.array(teacher.version.to_pylist(), dtype=object)
        self.has_teacher[rows] = True

    def take(self, idx: np.ndarray) -> _Open:
        """The rows at ``idx`` (views when they are a contiguous range)."""
        if idx.size and _is_range(idx):
            return self.slice(int(idx[0]), int(idx[-1]) + 1)
        return _Open(self.preds.take(idx), self.starts[idx], self.teacher_probs[idx],
                     None if self.teacher_logp is None else self.teacher_logp[idx], self.teacher_version[idx],
                     self.has_teacher[idx], self.label_joined[idx])

    def slice(self, begin: int, end: int) -> _Open:
        return _Open(self.preds.slice(begin, end), self.starts[begin:end], self.teacher_probs[begin:end],
                     None if self.teacher_logp is None else self.teacher_logp[begin:end],
                     self.teacher_version[begin:end], self.has_teacher[begin:end], self.label_joined[begin:end],
                     self.index, self.index_offset + begin)


def _concat_open(parts: list[_Open]) -> _Open:
    if len(parts) == 1:
        return parts[0]
    logp = None
    if any(p.teacher_logp is not None for p in parts):
        logp = np.concatenate([np.full(p.teacher_probs.shape, np.nan) if p.teacher_logp is None else p.teacher_logp
                               for p in parts])
    return _Open(concat([p.preds for p in parts]), np.concatenate([p.starts for p in parts]),
                 np.concatenate([p.teacher_probs for p in parts]), logp,
                 np.concatenate([p.teacher_version for p in parts]), np.concatenate([p.has_teacher for p in parts]),
                 np.concatenate([p.label_joined for p in parts]))


# Open predictions are kept as the chunks they arrived in (closing a window slices them instead of
# copying the rest); past this many chunks of one model they are joined into one.
MAX_CHUNKS = 8


@dataclass
class _Buffer:
    """Rows of one model still open: predictions with what joined them, early replays and labels."""

    chunks: list[_Open] = field(default_factory=list)
    early_teacher: Block | None = None
    early_label: Block | None = None


def _distinct(values: pa.Array) -> list[str]:
    return sorted(v for v in pc.unique(values).to_pylist() if v is not None)


def _lookup(values: Block, universe: Block) -> np.ndarray:
    """The row of ``universe`` with each request_id of ``values`` (-1: none).

    Keys are matched by a hash lookup on 64-bit integers and every match is confirmed on the
    strings; a key shared by two different request_ids raises Fallback.
    """
    at = _KeyIndex.of(universe.key).find(values.key, 0, universe.n)
    _confirm(values, universe, at)
    return at


def _confirm(values: Block, universe: Block, at: np.ndarray) -> None:
    """Raise Fallback unless each key match (``at`` >= 0) is the same request_id string."""
    hit = np.flatnonzero(at >= 0)
    if hit.size:
        same = pc.equal(values.request_id.take(pa.array(hit)), universe.request_id.take(pa.array(at[hit])))
        if not pc.all(same).as_py():
            raise Fallback("two request_ids share a 64-bit join key")


def _first_duplicate(values: pa.Array) -> str | None:
    if len(values) < 2:
        return None
    counts = pc.value_counts(values)
    many = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    return None if len(many) == 0 else str(many.field("values")[0])


def _duplicate(block: Block) -> str | None:
    """A request_id the block holds twice, if any."""
    if block.n < 2:
        return None
    keys = np.sort(block.key)
    if not (keys[1:] == keys[:-1]).any():
        return None
    duplicate = _first_duplicate(block.request_id)
    if duplicate is None:
        raise Fallback("two request_ids share a 64-bit join key")
    return duplicate


References = dict[str, Reference]


class ColumnarAnalyzer:
    """Windows and counters of Parquet inputs (see the module docstring).

    ``references`` may be a callable giving them (a reference still loading on another thread):
    it is called when the first window closes.
    """

    def __init__(self, window_ms: int, grace_ms: int,
                 references: References | Callable[[], References] | None = None) -> None:
        self.window_ms, self.grace_ms = window_ms, grace_ms
        self._references = references
        self.watermark: int | None = None
        self.observed: dict[str, int] = {}
        self.buffers: dict[str, _Buffer] = {}
        self.rejected: dict[WindowKey, int] = {}  # open windows' n_rejected
        self.windows: dict[WindowKey, WindowState] = {}  # final states
        self.counters: Counter[tuple[str, str]] = Counter()
        self.k: dict[str, int] = {}  # class count per model
        self.merged = 0  # rows of the merge stepped so far
        self.step_watermark = NEVER

    @cached_property
    def references(self) -> References:
        source = self._references
        return (source() if callable(source) else source) or {}

    @cached_property
    def fingerprints(self) -> dict[str, str]:
        return {m: r.fingerprint for m, r in self.references.items()}

    def _closed(self, start: np.ndarray | int) -> Any:
        if self.watermark is None:
            return np.zeros_like(start, dtype=bool) if isinstance(start, np.ndarray) else False
        return start + self.window_ms + self.grace_ms <= self.watermark

    def _starts(self, ts: np.ndarray) -> np.ndarray:
        return ts - ts % self.window_ms

    def step(self, blocks: dict[str, Block | None], hints: list[Hint], ends: dict[str, tuple[int, int]]) -> None:
        """Add one stretch of the merge: each input's rows in file order, and rejected predictions naming a window.

        ``ends`` holds, for each input whose file has ended, (merge key, row number) of its last row.
        """
        present = {kind: b for kind, b in blocks.items() if b is not None and b.n}
        for kind, block in present.items():
            self.counters[(kind, "valid")] += block.n
        hint_wm = self._arrivals(present, hints, ends)
        for (m, ver, ts, _mkey, _row), wm in zip(hints, hint_wm.tolist(), strict=True):
            start = ts - ts % self.window_ms
            if start + self.window_ms + self.grace_ms > wm:  # its window was open: it counts there
                key = WindowKey(m, ver, start)
                self.rejected[key] = self.rejected.get(key, 0) + 1
        models: set[str] = set()
        for block in present.values():
            models.update(_distinct(block.model))
        for model in sorted(models):
            parts = [present.get(kind) for kind in INPUTS]
            self._step_model(model, *(None if b is None else trim(b if len(models) == 1 else b.take(b.rows_of(model)))
                                      for b in parts))

    def _arrivals(self, blocks: dict[str, Block], hints: list[Hint], ends: dict[str, tuple[int, int]]) -> np.ndarray:
        """Each row's position in the merge and the watermark when it arrived (``position``, ``arrival_wm``).

        The watermark moves after every record, as in the record path offline: the least, over the
        inputs whose file has not ended yet, of the newest event time seen (collector.join's rule),
        never moving back. Returns the watermark at each hint's row; the step's last watermark is
        kept for advance().
        """
        kinds = [k for k in INPUTS if k in blocks]
        keys: list[np.ndarray] = []
        rows: list[np.ndarray] = []
        for k in kinds:
            assert blocks[k].mkey is not None and blocks[k].rowno is not None
            keys.append(blocks[k].mkey)  # type: ignore[arg-type]
            rows.append(blocks[k].rowno)  # type: ignore[arg-type]
        mkey = np.concatenate([*keys, np.array([h[3] for h in hints], dtype=np.int64)])
        rowno = np.concatenate([*rows, np.array([h[4] for h in hints], dtype=np.int64)])
        order = np.concatenate([np.full(blocks[k].n, ORDER[k]) for k in kinds] + [np.zeros(len(hints), dtype=np.int64)])
        # Rejected rows see nothing: their event time is not observed.
        seen = np.concatenate([blocks[k].ts for k in kinds] + [np.full(len(hints), NEVER, dtype=np.int64)])
        perm = np.lexsort((rowno, order, mkey))
        mkey, rowno, order, seen = mkey[perm], rowno[perm], order[perm], seen[perm]
        observed = {k: np.maximum(np.maximum.accumulate(np.where(order == ORDER[k], seen, NEVER)),
                                  self.observed.get(k, NEVER)) for k in INPUTS}
        newest = np.maximum.reduce([observed[k] for k in INPUTS])
        candidate = np.full(perm.size, np.iinfo(np.int64).max)
        unknown = newest == NEVER  # nothing seen at all yet
        for k in INPUTS:
            end = ends.get(k)
            if end is None:
                done = np.zeros(perm.size, dtype=bool)
            else:  # at and after the file's last row in the merge
                at_end = (mkey == end[0]) & ((order > ORDER[k]) | ((order == ORDER[k]) & (rowno >= end[1])))
                done = (mkey > end[0]) | at_end
            candidate = np.minimum(candidate, np.where(done, newest, observed[k]))
            unknown |= ~done & (observed[k] == NEVER)
        candidate = np.where(unknown, NEVER, candidate)
        start = NEVER if self.watermark is None else self.watermark
        after = np.maximum.accumulate(np.maximum(candidate, start)) if perm.size else np.zeros(0, dtype=np.int64)
        before = np.concatenate([[start], after[:-1]]) if perm.size else after
        self.step_watermark = int(after[-1]) if perm.size else start
        at = np.empty(perm.size, dtype=np.int64)
        at[perm] = np.arange(perm.size)
        offset = 0
        for k in kinds:
            n = blocks[k].n
            here = at[offset:offset + n]
            blocks[k].position = self.merged + here
            blocks[k].arrival_wm = before[here]
            offset += n
        self.merged += perm.size
        for k in kinds:
            self.observed[k] = int(observed[k][-1])
        return before[at[offset:]]

    def _step_model(self, model: str, preds: Block | None, teacher: Block | None, labels: Block | None) -> None:
        buf = self.buffers.setdefault(model, _Buffer())
        for block in (preds, teacher):
            if block is not None and block.n and block.probs is not None:
                k = block.probs.shape[1]
                if self.k.setdefault(model, k) != k:
                    raise Fallback(f"model {model!r} has events with {self.k[model]} and with {k} classes")
        if preds is not None and preds.n:
            assert preds.arrival_wm is not None
            starts = self._starts(preds.ts)
            late = starts + self.window_ms + self.grace_ms <= preds.arrival_wm
            if late.any():
                self.counters[("prediction", "late")] += int(late.sum())
                late_versions = preds.version.take(pa.array(np.flatnonzero(late), type=pa.int64())).to_pylist()
                for ver, start in zip(late_versions, starts[late].tolist(), strict=True):
                    self.windows.setdefault(WindowKey(model, ver, start), WindowState()).n_late += 1
                keep = np.flatnonzero(~late)
                preds, starts = preds.take(keep), starts[keep]
            if preds.n:
                self._add_predictions(model, buf, preds, starts)
        if teacher is not None and teacher.n:
            self._add_partners(model, buf, teacher, "teacher")
        if labels is not None and labels.n:
            self._add_partners(model, buf, labels, "label")

    def _add_predictions(self, model: str, buf: _Buffer, preds: Block, starts: np.ndarray) -> None:
        dup = _duplicate(preds)
        for chunk in buf.chunks if dup is None else ():
            hits = chunk.find(preds)
            if (hits >= 0).any():
                dup = str(preds.request_id[int(np.argmax(hits >= 0))].as_py())
                break
        if dup is not None:
            raise Fallback(f"prediction request_id {dup[:80]!r} of model {model!r} appears twice")
        assert preds.arrival_wm is not None
        chunk = _Open.new(preds, starts, self.k[model])
        # Replays and labels of earlier steps join now, if their own window was still open.
        for kind in ("teacher", "label"):
            early = buf.early_teacher if kind == "teacher" else buf.early_label
            if early is None or not early.n:
                continue
            at = _lookup(early, preds)
            matched = at >= 0
            matched[matched] &= self._starts(early.ts[matched]) + self.window_ms + self.grace_ms > preds.arrival_wm[at[matched]]
            if not matched.any():
                continue
            rows = at[matched]
            partners = early.take(np.flatnonzero(matched))
            self._check_partner(model, preds, rows, partners, kind)
            rest = early.take(np.flatnonzero(~matched))
            if kind == "teacher":
                chunk.set_teacher(rows, partners)
                buf.early_teacher = rest
            else:
                assert partners.label is not None
                chunk.label_joined[rows] = partners.label
                buf.early_label = rest
        buf.chunks.append(chunk)
        if len(buf.chunks) > MAX_CHUNKS:
            buf.chunks = [_concat_open(buf.chunks)]

    def _check_partner(self, model: str, preds: Block, rows: np.ndarray, partners: Block, kind: str) -> None:
        """Fallback for what the vectorised join does not model (see the module docstring)."""
        assert preds.audit is not None and preds.label is not None
        if (preds.audit[rows] > 0).any():
            raise Fallback(f"a {kind} record for an audit prediction of model {model!r}")
        if kind == "label":
            assert partners.label is not None
            if (preds.label[rows] >= 0).any():
                raise Fallback(f"a label record for a prediction of model {model!r} that carried its own label")
            if (partners.label >= self.k[model]).any():
                raise Fallback(f"a label record of model {model!r} outside the student's classes")

    def _add_partners(self, model: str, buf: _Buffer, block: Block, kind: str) -> None:
        dup = _duplicate(block)
        early = buf.early_teacher if kind == "teacher" else buf.early_label
        if dup is None and early is not None and early.n:
            hits = _lookup(block, early)
            if (hits >= 0).any():
                dup = str(block.request_id[int(np.argmax(hits >= 0))].as_py())
        if dup is not None:
            raise Fallback(f"{kind} request_id {dup[:80]!r} of model {model!r} appears twice")
        assert block.arrival_wm is not None and block.position is not None
        span = self.window_ms + self.grace_ms
        # Open at its own arrival: else it is late, whatever else it would have joined.
        own_open = self._starts(block.ts) + span > block.arrival_wm
        pending = np.arange(block.n)  # rows not yet found among the open predictions
        for chunk in buf.chunks:
            if not pending.size:
                break
            rest = block.take(pending)
            at = chunk.find(rest)
            found = at >= 0
            if not found.any():
                continue
            rows, who = at[found], pending[found]
            p = chunk.preds
            assert p.arrival_wm is not None and p.position is not None
            # The prediction came first: it joins while the prediction's window is open. The replay or
            # label came first: it waited (if its own window was open) and joins when the prediction comes.
            first = p.position[rows] < block.position[who]
            joins = np.where(first, chunk.starts[rows] + span > block.arrival_wm[who],
                             own_open[who] & (self._starts(block.ts[who]) + span > p.arrival_wm[rows]))
            pending = np.concatenate([pending[~found], who[~joins]])  # found but closed: as if absent
            pending.sort()
            if not joins.any():
                continue
            rows, who = rows[joins], who[joins]
            partners = block.take(who)
            self._check_partner(model, p, rows, partners, kind)
            if kind == "teacher":
                if chunk.has_teacher[rows].any():
                    raise Fallback(f"a second teacher replay for a request of model {model!r}")
                chunk.set_teacher(rows, partners)
            else:
                if (chunk.label_joined[rows] >= 0).any():
                    raise Fallback(f"a second label for a request of model {model!r}")
                assert partners.label is not None
                chunk.label_joined[rows] = partners.label
        if pending.size:
            late = ~own_open[pending]
            if late.any():
                self.counters[(kind, "late")] += int(late.sum())
            waiting = pending[~late]
            if waiting.size:
                rest = block.take(waiting)
                merged = rest if early is None or not early.n else concat([early, rest])
                if kind == "teacher":
                    buf.early_teacher = merged
                else:
                    buf.early_label = merged

    def advance(self, close_all: bool = False) -> None:
        """Move the watermark to where the last step left it and compute every window it closes."""
        if self.step_watermark != NEVER and (self.watermark is None or self.step_watermark > self.watermark):
            self.watermark = self.step_watermark
        for model, buf in self.buffers.items():
            self._close(model, buf, close_all)
        for key in sorted(self.rejected):
            if close_all or self._closed(key.window_start):
                state = self.windows.setdefault(key, WindowState())
                state.n_rejected += self.rejected.pop(key)

    def _close(self, model: str, buf: _Buffer, everything: bool) -> None:
        for kind in ("teacher", "label"):
            early = buf.early_teacher if kind == "teacher" else buf.early_label
            if early is None or not early.n:
                continue
            gone = np.ones(early.n, bool) if everything else self._closed(self._starts(early.ts))
            if gone.any():
                self.counters[(kind, "unmatched")] += int(gone.sum())
                kept = early.take(np.flatnonzero(~gone))
                if kind == "teacher":
                    buf.early_teacher = kept
                else:
                    buf.early_label = kept
        done_parts, open_parts = [], []
        for chunk in buf.chunks:
            done = np.ones(chunk.n, bool) if everything else self._closed(chunk.starts)
            if done.all():
                done_parts.append(chunk)
            elif done.any():
                done_parts.append(chunk.take(np.flatnonzero(done)))
                open_parts.append(chunk.take(np.flatnonzero(~done)))
            else:
                open_parts.append(chunk)
        buf.chunks = open_parts
        if done_parts:
            self._close_rows(model, _concat_open(done_parts))

    def _close_rows(self, model: str, rows: _Open) -> None:
        """Compute the windows of closed rows: one state per (student_version, window)."""
        encoded = pc.dictionary_encode(rows.preds.version)
        names = encoded.dictionary.to_pylist()
        codes = _np(encoded.indices).astype(np.int64)
        slot = (rows.starts - rows.starts.min()) // self.window_ms
        combo = codes * (int(slot.max()) + 1) + slot
        if rows.n > 1 and bool((np.diff(combo) < 0).any()):  # group the rows of each window together
            order = np.argsort(combo, kind="stable")
            rows, combo, codes = rows.take(order), combo[order], codes[order]
        edges = [0, *(np.flatnonzero(np.diff(combo)) + 1).tolist(), rows.n]
        groups = sorted(((int(rows.starts[b]), names[codes[b]], b, e) for b, e in pairwise(edges)),
                        key=lambda item: item[0])
        for start, ver, begin, end in groups:
            key = WindowKey(model, ver, start)
            state = self._window_state(model, rows.slice(begin, end))
            state.n_rejected += self.rejected.pop(key, 0)
            prior = self.windows.get(key)
            self.windows[key] = prior.merge(state) if prior is not None else state

    def _window_state(self, model: str, rows: _Open) -> WindowState:
        """One window's state from its predictions and what joined them, all at once."""
        p = rows.preds
        assert p.probs is not None and p.label is not None and p.audit is not None
        assert p.latency is not None and p.segment is not None
        state = WindowState()

        def student_log(idx: np.ndarray) -> np.ndarray:
            assert p.probs is not None
            floor = np.log(np.maximum(p.probs[idx], STUDENT_PROB_FLOOR))
            return floor if p.logp is None else np.where(np.isnan(p.logp[idx]), floor, p.logp[idx])

        label = np.where(p.label >= 0, p.label, rows.label_joined)
        audit = p.audit > 0
        prod = ~audit
        s_pred = np.argmax(p.probs, axis=1)
        confidence = np.take_along_axis(p.probs, s_pred[:, None], axis=1)[:, 0]
        state.n = int(prod.sum())
        lat = p.latency[prod]
        lat = lat[~np.isnan(lat)]
        if lat.size:
            state.latency.update(lat)
        reference = self.references.get(model)
        if reference is not None and state.n:
            drift = state.drift
            drift.fingerprint = self.fingerprints[model]
            every = bool(prod.all())
            for name, fb in reference.features.items():
                if name == CONFIDENCE:
                    counted = fb.count(confidence if every else confidence[prod])
                elif name == PREDICTED_CLASS:
                    counted = fb.count_classes(s_pred if every else s_pred[prod], p.probs.shape[1])
                elif name in p.features:
                    values = p.features[name] if every else p.features[name][prod]
                    counted = fb.count(values if values.dtype.kind == "f" else values.tolist())
                else:
                    continue
                drift.add_counts(name, counted)
        pair = prod & rows.has_teacher
        agree = np.zeros(p.n, dtype=bool)
        labeled = prod & (label >= 0)
        correct = s_pred == label
        if pair.any():
            idx = np.flatnonzero(pair)
            t = rows.teacher_probs[idx]
            t_log = np.log(np.where(t > 0, t, 1.0))
            if rows.teacher_logp is not None:
                t_log = np.where(np.isnan(rows.teacher_logp[idx]), t_log, rows.teacher_logp[idx])
            state.fidelity.update(t, t_log, p.probs[idx], student_log(idx))
            agree[idx] = np.argmax(t, axis=1) == s_pred[idx]
            for ver, count in Counter(rows.teacher_version[idx].tolist()).items():
                state.teacher_versions[ver] = count
        if labeled.any():
            state.calibration.update(confidence[labeled], correct[labeled])
        lt = labeled & rows.has_teacher
        if lt.any():
            idx = np.flatnonzero(lt)
            t = rows.teacher_probs[idx]
            state.n_labeled_with_teacher = int(idx.size)
            state.n_correct_student_lt = int(correct[idx].sum())
            state.teacher_calibration.update(t.max(axis=1), np.argmax(t, axis=1) == label[idx])
        if state.n:
            columns = [prod, pair, pair & agree, labeled, labeled & correct]
            if p.segment.null_count == p.n:  # no segments: one row of totals
                state.add_segments({NO_SEGMENT: [int(c.sum()) for c in columns]})
            else:
                segment = pc.dictionary_encode(pc.fill_null(p.segment.filter(pa.array(prod)), NO_SEGMENT))
                names = np.asarray(segment.dictionary.to_pylist(), dtype=object)
                if names.size > MAX_SEGMENTS:
                    raise Fallback(f"a window of model {model!r} has more than {MAX_SEGMENTS} segments")
                inverse = _np(segment.indices)
                counts = np.stack([np.bincount(inverse, weights=c[prod], minlength=names.size) for c in columns], axis=1)
                state.add_segments({str(name): [int(x) for x in row] for name, row in zip(names.tolist(), counts, strict=True)})
        if audit.any():
            idx = np.flatnonzero(audit)
            state.n_audit = int(idx.size)
            scores = attack_scores(p.probs[idx], student_log(idx), label[idx])
            ids = p.request_id.take(pa.array(idx, type=pa.int64())).to_pylist()
            state.membership.update(ids, p.audit[idx] == 1, scores)
        return state


def _prefetch(batches: Iterator[T]) -> Iterator[T]:
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


def analyze_parquet(
    predictions: Path,
    teacher: Path | None = None,
    labels: Path | None = None,
    *,
    window_ms: int = 60_000,
    grace_ms: int = 600_000,
    references: References | Callable[[], References] | None = None,
) -> tuple[dict[WindowKey, WindowState], dict[tuple[str, str], int]]:
    """Final window states and per-(kind, reason) counters; raises Fallback when the data needs the joiner.

    The inputs are read as the record path merges them (collector.offline.merged_events: by event
    time, ties by input and row; a file out of order is merged as a heap merge would, which is the
    order of the file's running maximum of ``ts``), in stretches: each step takes every row before
    the least merge key read so far among the files still open, reading the file that is furthest
    behind. Memory: about one batch per input plus the open windows.
    """
    analyzer = ColumnarAnalyzer(window_ms, grace_ms, references)
    paths = {"prediction": predictions, "teacher": teacher, "label": labels}
    readers = {kind: _prefetch(read_blocks(path, kind)) for kind, path in paths.items() if path is not None}
    carry: dict[str, list[Block]] = {kind: [] for kind in INPUTS}
    hints: list[Hint] = []
    read_to = dict.fromkeys(INPUTS, NEVER)  # merge key after the last row read
    ends = {kind: (NEVER, -1) for kind in INPUTS if paths[kind] is None}  # (merge key, row) of a file's last row

    def pull(kind: str) -> None:
        batch = next(readers[kind], None)
        if batch is None:  # an empty file
            ends[kind] = (NEVER, -1)
            return
        for reason, count in batch.reasons.items():
            analyzer.counters[(kind, reason)] += count
        if batch.block is not None and batch.block.n:
            carry[kind].append(batch.block)
        hints.extend(batch.hints)
        read_to[kind] = batch.end_key
        if batch.final:
            ends[kind] = (batch.end_key, batch.last_row)

    def step(horizon: float) -> None:
        """Step through every row read whose merge key is below ``horizon``."""
        blocks: dict[str, Block | None] = {}
        for kind in INPUTS:
            if not carry[kind]:
                continue
            rows = concat(carry[kind])
            assert rows.mkey is not None
            cut = int(np.searchsorted(rows.mkey, horizon, side="left"))  # merge keys never decrease in a file
            blocks[kind] = rows.slice(0, cut) if cut else None
            carry[kind] = [rows.slice(cut, rows.n)] if cut < rows.n else []
        now = [h for h in hints if h[3] < horizon]
        hints[:] = [h for h in hints if h[3] >= horizon]
        if now or any(b is not None and b.n for b in blocks.values()):
            analyzer.step(blocks, now, ends)
            analyzer.advance()

    while len(ends) < len(INPUTS):
        behind = min((kind for kind in INPUTS if kind not in ends), key=lambda kind: (read_to[kind], ORDER[kind]))
        pull(behind)
        still = [read_to[kind] for kind in INPUTS if kind not in ends]
        step(min(still) if still else math.inf)
    step(math.inf)
    analyzer.advance(close_all=True)
    return analyzer.windows, dict(analyzer.counters)


# ---- the per-record path over Parquet rows (the fallback) ----


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


def parquet_lines(path: Path, kind: str, order: int) -> Iterator[tuple[int, int, int, str, bytes, dict[str, Any] | None]]:
    """The offline merge's stream entries (see collector.offline.merged_events) for a Parquet file."""
    for rowno, obj in enumerate(parquet_records(path, kind)):
        ts = obj.get("ts")
        yield (ts if type(ts) is int else -1, order, rowno, kind, orjson.dumps(obj), obj)


# ---- JSONL -> Parquet ----


def _columns_for(kind: str, feature_types: dict[str, str]) -> pa.Schema:
    text, floats = pa.string(), pa.list_(pa.float64())
    base = [("request_id", text), ("model", text)]
    if kind == "prediction":
        fields = [*base, ("student_version", text), ("ts", pa.int64()), ("probs", floats), ("logits", floats),
                  ("latency_ms", pa.float64()),
                  ("features", pa.struct([(n, pa.string() if t == "str" else pa.float64()) for n, t in feature_types.items()])),
                  ("label", pa.int64()), ("audit", text), ("segment", text)]
        if not feature_types:
            fields = [f for f in fields if f[0] != "features"]
    elif kind == "teacher":
        fields = [*base, ("teacher_version", text), ("ts", pa.int64()), ("probs", floats), ("logits", floats)]
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
    if kind == "prediction":
        with source.open("rb") as handle:  # first pass: the feature columns and their types
            for line in handle:
                try:
                    features = orjson.loads(line).get("features")
                except (orjson.JSONDecodeError, AttributeError):
                    continue  # the second pass rejects it with its reason
                if not isinstance(features, dict):
                    continue
                for name, value in features.items():
                    t = "str" if isinstance(value, str) else "num"
                    if feature_types.setdefault(name, t) != t:
                        raise SchemaError(f"feature {name!r} holds both numbers and strings: one Parquet column cannot")
    schema = _columns_for(kind, dict(sorted(feature_types.items())))
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
