"""The columnar offline path: `kdwatch analyze` over Parquet files, validated and computed on columns.

The files hold the event contract as columns (README, "Parquet input"): one row per event, the
contract's field names as column names, ``ts`` as int64 epoch milliseconds or an Arrow timestamp,
``probs`` / ``logits`` as lists of numbers, ``features`` as a struct of numeric or string fields.
A column the contract does not know, or of a type it cannot hold, fails the whole file at once,
naming the column.

Rows are validated with the same rules, in the same order and with the same reason codes as
:mod:`collector.contract`, but over whole columns. Then the three files are read in event-time
steps (a batch of predictions, and the replays and labels up to its newest event time), joined by
``request_id`` with numpy and pyarrow hash lookups, and each window's state is computed once, when
the watermark closes it. The rules are the stream joiner's (collector.join): the watermark is the
least newest event time of the inputs still being read, a window closes at ``start + size + grace``,
a replay or label joins its prediction when both arrive before the prediction's window closes,
predictions of closed windows are late, and replays or labels left without a prediction when their
own window closes are unmatched. Memory is bounded by one step plus the open windows.

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
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from analyzer.drift import CONFIDENCE, PREDICTED_CLASS, Reference, ReferenceBuilder
from analyzer.fidelity import STUDENT_PROB_FLOOR
from analyzer.membership import attack_scores
from analyzer.window import MAX_SEGMENTS, WindowState
from collector.contract import (
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
from collector.join import INPUTS, NO_SEGMENT, WindowKey, watermark_candidate
from kdwatch.errors import ContractError, SchemaError

BATCH_ROWS = 65_536
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
    missing = col.is_null().to_numpy(zero_copy_only=False)
    length = pc.fill_null(pc.utf8_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return col, missing, length


def _ints(batch: pa.RecordBatch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(int64 values, missing mask) of an integer column."""
    n = batch.num_rows
    if name not in batch.schema.names or pa.types.is_null(batch.schema.field(name).type):
        return np.zeros(n, dtype=np.int64), np.ones(n, dtype=bool)
    col = batch.column(name)
    if pa.types.is_timestamp(col.type):
        col = pc.cast(pc.cast(col, pa.timestamp("ms", tz=col.type.tz)), pa.int64())
    missing = col.is_null().to_numpy(zero_copy_only=False)
    return pc.fill_null(pc.cast(col, pa.int64()), 0).to_numpy(zero_copy_only=False), missing


@dataclass
class Block:
    """Validated rows of one kind, as columns (probabilities as an (n, K) matrix)."""

    kind: str
    request_id: pa.Array
    model: pa.Array
    version: pa.Array  # student_version / teacher_version; null for labels
    ts: np.ndarray
    probs: np.ndarray | None = None  # (n, K), renormalised
    logp: np.ndarray | None = None  # (n, K): exact log-softmax where sent as logits, else NaN rows
    label: np.ndarray | None = None  # -1: none
    latency: np.ndarray | None = None  # NaN: none
    audit: np.ndarray | None = None  # 0 none, 1 member, 2 nonmember
    segment: pa.Array | None = None  # null: none
    features: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.ts.shape[0])

    def take(self, idx: np.ndarray) -> Block:
        def sub(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[idx]

        at = pa.array(idx, type=pa.int64())
        return Block(self.kind, self.request_id.take(at), self.model.take(at), self.version.take(at), self.ts[idx],
                     sub(self.probs), sub(self.logp), sub(self.label), sub(self.latency), sub(self.audit),
                     None if self.segment is None else self.segment.take(at), {k: v[idx] for k, v in self.features.items()})

    def rows_of(self, model: str) -> np.ndarray:
        return np.flatnonzero(pc.equal(self.model, model).to_numpy(zero_copy_only=False))


def concat(blocks: list[Block]) -> Block:
    """Rows of blocks of one kind and class count, in order."""
    if len(blocks) == 1:
        return blocks[0]
    first = blocks[0]

    def cat(name: str) -> Any:
        parts = [getattr(b, name) for b in blocks]
        if parts[0] is None:
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
    return Block(first.kind, cat("request_id"), cat("model"), cat("version"), cat("ts"), cat("probs"), cat("logp"),
                 cat("label"), cat("latency"), cat("audit"), cat("segment"), features)


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

    Rows are checked and normalised in groups of equal class count, so each row's arithmetic is the
    decoder's (summing a padded row would group the additions differently).
    """
    n = batch.num_rows
    names = batch.schema.names

    def column(name: str) -> pa.Array | None:
        if name not in names or pa.types.is_null(batch.schema.field(name).type):
            return None
        return batch.column(name)

    probs_col, logits_col = column("probs"), column("logits")
    has_p = np.zeros(n, bool) if probs_col is None else ~probs_col.is_null().to_numpy(zero_copy_only=False)
    has_l = np.zeros(n, bool) if logits_col is None else ~logits_col.is_null().to_numpy(zero_copy_only=False)
    rej.flag(has_p == has_l, "probs_or_logits")
    lengths = np.zeros(n, dtype=np.int64)
    for col, has in ((probs_col, has_p), (logits_col, has_l)):
        if col is not None:
            lengths = np.where(has, pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False), lengths)
    rej.flag(~((lengths >= 2) & (lengths <= MAX_CLASSES)), "bad_class_count")
    ok = rej.ok
    if not ok.any():
        return None, None
    ks = np.unique(lengths[ok])
    width = int(ks.max())
    probs = np.full((n, width), np.nan)
    logp = np.full((n, width), np.nan)
    for k in ks.tolist():
        group = rej.ok & (lengths == k)
        matrix = np.full((n, k), np.nan)
        logits_rows = np.zeros(n, bool)
        for col, has, is_logits in ((probs_col, has_p, False), (logits_col, has_l, True)):
            rows = group & has
            if col is None or not rows.any():
                continue
            flat = pc.list_flatten(col.filter(pa.array(rows)))
            values = pc.fill_null(pc.cast(flat, pa.float64()), np.nan).to_numpy(zero_copy_only=False).reshape(-1, k)
            wrong = np.zeros(n, bool)
            wrong[rows] = pc.is_null(flat).to_numpy(zero_copy_only=False).reshape(-1, k).any(axis=1)
            rej.flag(wrong, "wrong_type")
            matrix[rows] = values
            if is_logits:
                logits_rows |= rows
        rej.flag(group & rej.ok & ~np.isfinite(matrix).all(axis=1), "not_finite")
        prob_rows = group & rej.ok & has_p
        rej.flag(prob_rows & (np.where(prob_rows[:, None], matrix, 0.0) < 0).any(axis=1), "negative_probability")
        prob_rows = group & rej.ok & has_p
        totals = np.where(prob_rows, matrix.sum(axis=1), 1.0)
        rej.flag(prob_rows & (np.abs(totals - 1.0) > PROB_SUM_TOLERANCE), "probs_not_normalised")
        prob_rows = group & rej.ok & has_p
        probs[prob_rows, :k] = matrix[prob_rows] / totals[prob_rows, None]
        lrows = group & rej.ok & logits_rows
        if lrows.any():
            logits = matrix[lrows]
            shifted = logits - logits.max(axis=1, keepdims=True)
            log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
            logp[lrows, :k] = log_probs
            probs[lrows, :k] = np.exp(log_probs)
    return probs, logp


def _class_counts(probs: np.ndarray) -> np.ndarray:
    """Each row's class count (its probabilities are NaN beyond it)."""
    return (~np.isnan(probs)).sum(axis=1)


def trim(block: Block) -> Block:
    """The block with its matrices cut to its single class count (several: Fallback)."""
    if block.probs is None or not block.n:
        return block
    ks = np.unique(_class_counts(block.probs))
    if ks.size > 1:
        raise Fallback(f"model {block.model[0].as_py()!r} has events with {ks[:5].tolist()} classes")
    k = int(ks[0])
    if k == block.probs.shape[1]:
        return block
    assert block.logp is not None
    return replace(block, probs=block.probs[:, :k], logp=block.logp[:, :k])


def _features(batch: pa.RecordBatch, rej: Rejections) -> dict[str, np.ndarray]:
    """Feature columns: float64 (NaN: missing) or object (None: missing)."""
    if "features" not in batch.schema.names or pa.types.is_null(batch.schema.field("features").type):
        return {}
    col = batch.column("features")
    outer_missing = col.is_null().to_numpy(zero_copy_only=False)
    out: dict[str, np.ndarray] = {}
    for i, sub in enumerate(col.type):
        child = pc.struct_field(col, [i])
        st = sub.type
        if pa.types.is_null(st):
            continue
        missing = child.is_null().to_numpy(zero_copy_only=False) | outer_missing
        if pa.types.is_string(st) or pa.types.is_large_string(st):
            values = child.to_numpy(zero_copy_only=False).astype(object)
            length = pc.fill_null(pc.utf8_length(child), 0).to_numpy(zero_copy_only=False)
            rej.flag(~missing & (length > MAX_STRING_CHARS), "string_too_long")
            values[missing] = None
        else:
            values = pc.fill_null(pc.cast(child, pa.float64()), np.nan).to_numpy(zero_copy_only=False).copy()
            rej.flag(~missing & ~np.isfinite(values), "not_finite")
            values[missing] = np.nan
        out[sub.name] = values
    return out


def validate(batch: pa.RecordBatch, kind: str) -> tuple[Block | None, dict[str, int], dict[WindowKey, int]]:
    """(valid rows, rejected count per reason, rejected predictions per window they name).

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
            lat_col = batch.column("latency_ms")
            lat_missing = lat_col.is_null().to_numpy(zero_copy_only=False)
            latency = pc.fill_null(pc.cast(lat_col, pa.float64()), np.nan).to_numpy(zero_copy_only=False).copy()
            rej.flag(~lat_missing & (~np.isfinite(latency) | (latency < 0)), "bad_latency")
            latency[lat_missing] = np.nan
        else:
            latency = np.full(n, np.nan)
        rej.flag(~label_missing & ((label < 0) | (label >= MAX_CLASSES)), "label_out_of_range")
        if probs is not None:
            rej.flag(~label_missing & (label >= _class_counts(probs)), "label_out_of_range")
        audit_values, audit_missing, _len = _strings(batch, "audit")
        audit = np.zeros(n, dtype=np.int8)
        for text, code in AUDIT_CODE.items():
            audit[pc.fill_null(pc.equal(audit_values, text), False).to_numpy(zero_copy_only=False)] = code
        rej.flag(~audit_missing & (audit == 0), "bad_audit")
        rej.flag((audit > 0) & label_missing, "missing_field")
        features = _features(batch, rej)
        seg = _strings(batch, "segment")
        _check_string(rej, seg, False)
        segment = seg[0]
    ok = rej.ok
    reasons = rej.counts()
    hints: dict[WindowKey, int] = {}
    if kind == "prediction" and not ok.all():
        assert version is not None
        readable = ~ok & ts_ok
        for f in (model, version):
            readable &= ~f[1] & (f[2] > 0) & (f[2] <= MAX_STRING_CHARS)
        at = pa.array(np.flatnonzero(readable), type=pa.int64())
        for m, ver, t in zip(model[0].take(at).to_pylist(), version[0].take(at).to_pylist(), ts[readable].tolist(), strict=True):
            key = WindowKey(m, ver, t)
            hints[key] = hints.get(key, 0) + 1
    if not ok.any():
        return None, dict(reasons), hints
    idx = np.flatnonzero(ok)
    at = pa.array(idx, type=pa.int64())
    block = Block(
        kind, request_id[0].take(at), model[0].take(at),
        version[0].take(at) if version is not None else pa.nulls(idx.size, pa.string()), ts[idx],
        None if probs is None else probs[idx], None if logp is None else logp[idx],
        np.where(label_missing, -1, label)[idx], None if latency is None else latency[idx],
        None if audit is None else audit[idx], None if segment is None else segment.take(at),
        {k: a[idx] for k, a in features.items()})
    return block, dict(reasons), hints


def read_blocks(path: Path, kind: str) -> Iterator[tuple[Block | None, dict[str, int], dict[WindowKey, int]]]:
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
    for batch in file.iter_batches(batch_size=BATCH_ROWS):
        block, reasons, hints = validate(batch, kind)
        yield block, reasons, hints


# ---- references ----


def load_reference_parquet(path: Path) -> dict[str, Reference]:
    """Per-model references from a Parquet file of baseline predictions (audit rows skipped).

    An invalid row fails the load naming its row number and reason, like the JSONL reference.
    """
    numbers: dict[str, dict[str, list[np.ndarray]]] = {}
    strings: dict[str, dict[str, Counter[str]]] = {}
    row0 = 0
    file = pq.ParquetFile(path, pre_buffer=False)
    check_schema(file.schema_arrow, "prediction", path)
    for batch in file.iter_batches(batch_size=BATCH_ROWS):
        block, reasons, _hints = validate(batch, "prediction")
        if reasons:
            # Re-validate to find the first bad row (rare: a reference is expected to be clean).
            for i in range(batch.num_rows):
                _one, bad, _h = validate(batch.slice(i, 1), "prediction")
                if bad:
                    reason = next(iter(bad))
                    raise ContractError(reason, f"row {row0 + i + 1}: {reason}")
        row0 += batch.num_rows
        if block is None:
            continue
        assert block.probs is not None and block.audit is not None
        keep = block.audit == 0
        for m in _distinct(block.model):
            rows = keep & pc.equal(block.model, m).to_numpy(zero_copy_only=False)
            nums = numbers.setdefault(m, {})
            strs = strings.setdefault(m, {})
            probs = block.probs[rows]
            probs = probs[:, : int(_class_counts(probs).max())] if probs.size else probs
            probs = np.where(np.isnan(probs), -np.inf, probs)  # rows of fewer classes: padding never wins
            nums.setdefault(CONFIDENCE, []).append(probs.max(axis=1))
            classes = np.bincount(np.argmax(probs, axis=1), minlength=probs.shape[1])
            strs.setdefault(PREDICTED_CLASS, Counter()).update({str(k): int(c) for k, c in enumerate(classes) if c})
            for name, values in block.features.items():
                col = values[rows]
                if col.dtype.kind == "f":
                    nums.setdefault(name, []).append(col[~np.isnan(col)])
                else:
                    strs.setdefault(name, Counter()).update(v for v in col.tolist() if v is not None)
    references: dict[str, Reference] = {}
    for m in numbers:
        builder = ReferenceBuilder()
        for name, parts in numbers[m].items():
            joined = np.concatenate(parts)
            if joined.size:
                builder.numbers[name] = joined  # type: ignore[assignment]
        builder.strings = {name: c for name, c in strings[m].items() if c}
        references[m] = builder.build()
    return references


# ---- the vectorised join and windows ----


@dataclass
class _Buffer:
    """Rows of one model still open: predictions with what joined them, early replays and labels."""

    preds: Block | None = None
    teacher_probs: np.ndarray | None = None
    teacher_logp: np.ndarray | None = None
    teacher_version: np.ndarray | None = None
    has_teacher: np.ndarray | None = None
    label_joined: np.ndarray | None = None  # a label that came as its own record (-1: none)
    early_teacher: Block | None = None
    early_label: Block | None = None


def _distinct(values: pa.Array) -> list[str]:
    return sorted(v for v in pc.unique(values).to_pylist() if v is not None)


def _index_in(values: pa.Array, universe: pa.Array) -> np.ndarray:
    """Position of each value in ``universe`` (-1 where absent), by a hash lookup."""
    if len(values) == 0 or len(universe) == 0:
        return np.full(len(values), -1, dtype=np.int64)
    found = pc.index_in(values, value_set=universe)
    return pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _first_duplicate(values: pa.Array) -> str | None:
    if len(values) < 2:
        return None
    counts = pc.value_counts(values)
    many = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    return None if len(many) == 0 else str(many.field("values")[0])


class ColumnarAnalyzer:
    """Windows and counters of Parquet inputs (see the module docstring)."""

    def __init__(self, window_ms: int, grace_ms: int, references: dict[str, Reference] | None = None) -> None:
        self.window_ms, self.grace_ms = window_ms, grace_ms
        self.references = references or {}
        self.fingerprints = {m: r.fingerprint for m, r in self.references.items()}
        self.watermark: int | None = None
        self.observed: dict[str, int] = {}
        self.buffers: dict[str, _Buffer] = {}
        self.rejected: dict[WindowKey, int] = {}  # open windows' n_rejected
        self.windows: dict[WindowKey, WindowState] = {}  # final states
        self.counters: Counter[tuple[str, str]] = Counter()
        self.k: dict[str, int] = {}  # class count per model

    def _closed(self, start: np.ndarray | int) -> Any:
        if self.watermark is None:
            return np.zeros_like(start, dtype=bool) if isinstance(start, np.ndarray) else False
        return start + self.window_ms + self.grace_ms <= self.watermark

    def _starts(self, ts: np.ndarray) -> np.ndarray:
        return ts - ts % self.window_ms

    def add_rejections(self, kind: str, reasons: dict[str, int], hints: dict[WindowKey, int]) -> None:
        for reason, count in reasons.items():
            self.counters[(kind, reason)] += count
        for (m, ver, ts), count in hints.items():
            start = ts - ts % self.window_ms
            if not self._closed(start):
                key = WindowKey(m, ver, start)
                self.rejected[key] = self.rejected.get(key, 0) + count

    def _observe(self, kind: str, ts: np.ndarray) -> None:
        if ts.size:
            newest = int(ts.max())
            if newest > self.observed.get(kind, -1):
                self.observed[kind] = newest

    def step(self, preds: Block | None, teacher: Block | None, labels: Block | None) -> None:
        """Add one step's valid rows (each in arrival order)."""
        for kind, block in (("prediction", preds), ("teacher", teacher), ("label", labels)):
            if block is not None and block.n:
                self.counters[(kind, "valid")] += block.n
        models: set[str] = set()
        for block in (preds, teacher, labels):
            if block is not None and block.n:
                models.update(_distinct(block.model))
        for model in sorted(models):
            self._step_model(model, *(None if b is None or not b.n else trim(b if len(models) == 1 else b.take(b.rows_of(model)))
                                      for b in (preds, teacher, labels)))

    def _step_model(self, model: str, preds: Block | None, teacher: Block | None, labels: Block | None) -> None:
        buf = self.buffers.setdefault(model, _Buffer())
        for block in (preds, teacher):
            if block is not None and block.n and block.probs is not None:
                k = block.probs.shape[1]
                if self.k.setdefault(model, k) != k:
                    raise Fallback(f"model {model!r} has events with {self.k[model]} and with {k} classes")
        if preds is not None and preds.n:
            late = self._closed(self._starts(preds.ts))
            if late.any():
                self.counters[("prediction", "late")] += int(late.sum())
                starts = self._starts(preds.ts[late])
                late_versions = preds.version.take(pa.array(np.flatnonzero(late), type=pa.int64())).to_pylist()
                for ver, start in zip(late_versions, starts.tolist(), strict=True):
                    self.windows.setdefault(WindowKey(model, ver, start), WindowState()).n_late += 1
                preds = preds.take(np.flatnonzero(~late))
            if preds.n:
                self._add_predictions(model, buf, preds)
        if teacher is not None and teacher.n:
            self._observe("teacher", teacher.ts)
            self._add_partners(model, buf, teacher, "teacher")
        if labels is not None and labels.n:
            self._observe("label", labels.ts)
            self._add_partners(model, buf, labels, "label")

    def _add_predictions(self, model: str, buf: _Buffer, preds: Block) -> None:
        dup = _first_duplicate(preds.request_id)
        if dup is None and buf.preds is not None:
            hits = _index_in(preds.request_id, buf.preds.request_id)
            if (hits >= 0).any():
                dup = str(preds.request_id[int(np.argmax(hits >= 0))].as_py())
        if dup is not None:
            raise Fallback(f"prediction request_id {dup[:80]!r} of model {model!r} appears twice")
        self._observe("prediction", preds.ts)
        n, k = preds.n, self.k[model]
        new_tp = np.full((n, k), np.nan)
        new_tl = np.full((n, k), np.nan)
        new_tv = np.full(n, None, dtype=object)
        new_ht = np.zeros(n, dtype=bool)
        new_lj = np.full(n, -1, dtype=np.int64)
        # Replays and labels that came first join now.
        for kind in ("teacher", "label"):
            early = buf.early_teacher if kind == "teacher" else buf.early_label
            if early is None or not early.n:
                continue
            at = _index_in(early.request_id, preds.request_id)
            matched = at >= 0
            if not matched.any():
                continue
            rows = at[matched]
            self._check_partner(model, preds, rows, early.take(np.flatnonzero(matched)), kind)
            if kind == "teacher":
                assert early.probs is not None and early.logp is not None
                new_tp[rows], new_tl[rows] = early.probs[matched], early.logp[matched]
                new_tv[rows] = early.version.take(pa.array(np.flatnonzero(matched), type=pa.int64())).to_numpy(zero_copy_only=False)
                new_ht[rows] = True
                buf.early_teacher = early.take(np.flatnonzero(~matched))
            else:
                assert early.label is not None
                new_lj[rows] = early.label[matched]
                buf.early_label = early.take(np.flatnonzero(~matched))
        if buf.preds is None:
            buf.preds, buf.teacher_probs, buf.teacher_logp = preds, new_tp, new_tl
            buf.teacher_version, buf.has_teacher, buf.label_joined = new_tv, new_ht, new_lj
        else:
            assert buf.teacher_probs is not None and buf.teacher_logp is not None and buf.teacher_version is not None
            assert buf.has_teacher is not None and buf.label_joined is not None
            buf.preds = concat([buf.preds, preds])
            buf.teacher_probs = np.concatenate([buf.teacher_probs, new_tp])
            buf.teacher_logp = np.concatenate([buf.teacher_logp, new_tl])
            buf.teacher_version = np.concatenate([buf.teacher_version, new_tv])
            buf.has_teacher = np.concatenate([buf.has_teacher, new_ht])
            buf.label_joined = np.concatenate([buf.label_joined, new_lj])

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
        dup = _first_duplicate(block.request_id)
        early = buf.early_teacher if kind == "teacher" else buf.early_label
        if dup is None and early is not None and early.n:
            hits = _index_in(block.request_id, early.request_id)
            if (hits >= 0).any():
                dup = str(block.request_id[int(np.argmax(hits >= 0))].as_py())
        if dup is not None:
            raise Fallback(f"{kind} request_id {dup[:80]!r} of model {model!r} appears twice")
        matched = np.zeros(block.n, dtype=bool)
        if buf.preds is not None and buf.preds.n:
            at = _index_in(block.request_id, buf.preds.request_id)
            matched = at >= 0
            if matched.any():
                rows = at[matched]
                partners = block.take(np.flatnonzero(matched))
                self._check_partner(model, buf.preds, rows, partners, kind)
                assert buf.has_teacher is not None and buf.label_joined is not None
                if kind == "teacher":
                    if buf.has_teacher[rows].any():
                        raise Fallback(f"a second teacher replay for a request of model {model!r}")
                    assert buf.teacher_probs is not None and buf.teacher_logp is not None and buf.teacher_version is not None
                    assert partners.probs is not None and partners.logp is not None
                    buf.teacher_probs[rows], buf.teacher_logp[rows] = partners.probs, partners.logp
                    buf.teacher_version[rows] = partners.version.to_numpy(zero_copy_only=False)
                    buf.has_teacher[rows] = True
                else:
                    if (buf.label_joined[rows] >= 0).any():
                        raise Fallback(f"a second label for a request of model {model!r}")
                    assert partners.label is not None
                    buf.label_joined[rows] = partners.label
        rest = block.take(np.flatnonzero(~matched))
        if rest.n:
            late = self._closed(self._starts(rest.ts))
            if late.any():
                self.counters[(kind, "late")] += int(late.sum())
                rest = rest.take(np.flatnonzero(~late))
            if rest.n:
                merged = rest if early is None or not early.n else concat([early, rest])
                if kind == "teacher":
                    buf.early_teacher = merged
                else:
                    buf.early_label = merged

    def advance(self, caught_up: dict[str, bool], close_all: bool = False) -> None:
        """Move the watermark (the stream joiner's rule) and compute every window it closes."""
        candidate = watermark_candidate(self.observed, caught_up)
        if candidate is not None and (self.watermark is None or candidate > self.watermark):
            self.watermark = candidate
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
        preds = buf.preds
        if preds is None or not preds.n:
            return
        starts = self._starts(preds.ts)
        done = np.ones(preds.n, bool) if everything else self._closed(starts)
        if not done.any():
            return
        assert buf.teacher_probs is not None and buf.teacher_logp is not None and buf.teacher_version is not None
        assert buf.has_teacher is not None and buf.label_joined is not None
        idx = np.flatnonzero(done)
        encoded = pc.dictionary_encode(preds.version.take(pa.array(idx, type=pa.int64())))
        names = encoded.dictionary.to_pylist()
        codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        slot = (starts[idx] - starts[idx].min()) // self.window_ms
        combo = codes * (int(slot.max()) + 1) + slot
        order = np.argsort(combo, kind="stable")
        bounds = np.flatnonzero(np.diff(combo[order])) + 1
        groups = sorted(((int(starts[idx[g[0]]]), names[codes[g[0]]], idx[g]) for g in np.split(order, bounds)),
                        key=lambda item: item[0])
        for start, ver, r in groups:
            key = WindowKey(model, ver, start)
            state = self._window_state(model, preds.take(r), buf.teacher_probs[r], buf.teacher_logp[r],
                                       buf.teacher_version[r], buf.has_teacher[r], buf.label_joined[r])
            state.n_rejected += self.rejected.pop(key, 0)
            prior = self.windows.get(key)
            self.windows[key] = prior.merge(state) if prior is not None else state
        keep = np.flatnonzero(~done)
        buf.preds = preds.take(keep)
        buf.teacher_probs, buf.teacher_logp = buf.teacher_probs[keep], buf.teacher_logp[keep]
        buf.teacher_version, buf.has_teacher = buf.teacher_version[keep], buf.has_teacher[keep]
        buf.label_joined = buf.label_joined[keep]

    def _window_state(self, model: str, p: Block, t_probs: np.ndarray, t_logp: np.ndarray, t_version: np.ndarray,
                      has_teacher: np.ndarray, label_joined: np.ndarray) -> WindowState:
        """One window's state from its predictions and what joined them, all at once."""
        assert p.probs is not None and p.logp is not None and p.label is not None and p.audit is not None
        assert p.latency is not None and p.segment is not None
        state = WindowState()
        label = np.where(p.label >= 0, p.label, label_joined)
        audit = p.audit > 0
        prod = ~audit
        s_logp = np.where(np.isnan(p.logp), np.log(np.maximum(p.probs, STUDENT_PROB_FLOOR)), p.logp)
        s_pred = np.argmax(p.probs, axis=1)
        confidence = p.probs.max(axis=1)
        state.n = int(prod.sum())
        lat = p.latency[prod]
        lat = lat[~np.isnan(lat)]
        if lat.size:
            state.latency.update(lat)
        reference = self.references.get(model)
        if reference is not None and state.n:
            drift = state.drift
            drift.fingerprint = self.fingerprints[model]
            for name, fb in reference.features.items():
                if name == CONFIDENCE:
                    counted = fb.count(confidence[prod])
                elif name == PREDICTED_CLASS:
                    counted = fb.count_classes(s_pred[prod], p.probs.shape[1])
                elif name in p.features:
                    values = p.features[name][prod]
                    counted = fb.count(values if values.dtype.kind == "f" else values.tolist())
                else:
                    continue
                drift.add_counts(name, counted)
        pair = prod & has_teacher
        t_pred = np.argmax(t_probs, axis=1)
        if pair.any():
            t = t_probs[pair]
            t_log = np.where(np.isnan(t_logp[pair]), np.log(np.where(t > 0, t, 1.0)), t_logp[pair])
            state.fidelity.update(t, t_log, p.probs[pair], s_logp[pair])
            for ver, count in Counter(t_version[pair].tolist()).items():
                state.teacher_versions[ver] = count
        labeled = prod & (label >= 0)
        correct = s_pred == label
        if labeled.any():
            state.calibration.update(confidence[labeled], correct[labeled])
        lt = labeled & has_teacher
        if lt.any():
            state.n_labeled_with_teacher = int(lt.sum())
            state.n_correct_student_lt = int(correct[lt].sum())
            state.teacher_calibration.update(t_probs[lt].max(axis=1), t_pred[lt] == label[lt])
        if state.n:
            segment = pc.dictionary_encode(pc.fill_null(p.segment.take(pa.array(np.flatnonzero(prod), type=pa.int64())),
                                                        NO_SEGMENT))
            names = np.asarray(segment.dictionary.to_pylist(), dtype=object)
            inverse = segment.indices.to_numpy(zero_copy_only=False)
            agree = (t_pred == s_pred)
            columns = [np.ones(state.n, bool), pair[prod], (pair & agree)[prod], labeled[prod], (labeled & correct)[prod]]
            if names.size > MAX_SEGMENTS:
                raise Fallback(f"a window of model {model!r} has more than {MAX_SEGMENTS} segments")
            counts = np.stack([np.bincount(inverse, weights=c, minlength=names.size) for c in columns], axis=1)
            state.add_segments({str(name): [int(x) for x in row] for name, row in zip(names.tolist(), counts, strict=True)})
        if audit.any():
            state.n_audit = int(audit.sum())
            scores = attack_scores(p.probs[audit], s_logp[audit], label[audit])
            ids = p.request_id.take(pa.array(np.flatnonzero(audit), type=pa.int64())).to_pylist()
            state.membership.update(ids, p.audit[audit] == 1, scores)
        return state


def analyze_parquet(
    predictions: Path,
    teacher: Path | None = None,
    labels: Path | None = None,
    *,
    window_ms: int = 60_000,
    grace_ms: int = 600_000,
    references: dict[str, Reference] | None = None,
) -> tuple[dict[WindowKey, WindowState], dict[tuple[str, str], int]]:
    """Final window states and per-(kind, reason) counters; raises Fallback when the data needs the joiner."""
    analyzer = ColumnarAnalyzer(window_ms, grace_ms, references)
    readers = {"prediction": read_blocks(predictions, "prediction")}
    if teacher is not None:
        readers["teacher"] = read_blocks(teacher, "teacher")
    if labels is not None:
        readers["label"] = read_blocks(labels, "label")
    carry: dict[str, list[Block]] = {"teacher": [], "label": []}
    exhausted = {"prediction": False, "teacher": teacher is None, "label": labels is None}

    def pull(kind: str) -> bool:
        """Read the next batch of ``kind`` into the carry; False at the end of the file."""
        try:
            block, reasons, hints = next(readers[kind])
        except StopIteration:
            exhausted[kind] = True
            return False
        analyzer.add_rejections(kind, reasons, hints)
        if block is not None and block.n:
            carry.setdefault(kind, []).append(block)
        return True

    def take_until(kind: str, horizon: float) -> Block | None:
        """The carried rows of ``kind`` up to the first one later than ``horizon``, reading on as needed."""
        while not exhausted[kind] and (not carry[kind] or carry[kind][-1].ts.max() <= horizon):
            pull(kind)
        if not carry[kind]:
            return None
        rows = concat(carry[kind])
        beyond = rows.ts > horizon
        cut = int(np.argmax(beyond)) if beyond.any() else rows.n
        carry[kind] = [rows.take(np.arange(cut, rows.n))] if cut < rows.n else []
        return rows.take(np.arange(cut)) if cut else None

    while not all(exhausted.values()) or any(carry.values()):
        preds: Block | None = None
        horizon = math.inf
        if not exhausted["prediction"]:
            carry["prediction"] = []
            if pull("prediction") and carry["prediction"]:
                preds = carry["prediction"][0]
                horizon = float(preds.ts.max())
            carry["prediction"] = []
            if not exhausted["prediction"] and preds is None:
                continue
        if exhausted["prediction"] and preds is None:
            horizon = math.inf
        if horizon == math.inf:
            # Predictions are done: read the rest a batch at a time so memory stays bounded.
            parts = {}
            for kind in ("teacher", "label"):
                if not exhausted[kind] and not carry[kind]:
                    pull(kind)
                parts[kind] = concat(carry[kind]) if carry[kind] else None
                carry[kind] = []
            analyzer.step(None, parts["teacher"], parts["label"])
        else:
            analyzer.step(preds, take_until("teacher", horizon), take_until("label", horizon))
        caught_up = {kind: exhausted[kind] and not carry.get(kind) for kind in INPUTS}
        analyzer.advance(caught_up)
    analyzer.advance({kind: True for kind in INPUTS}, close_all=True)
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
    from collector.contract import DECODERS, parse_ts

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
