"""The event contract's rules over whole columns: the same checks, order and reason codes as
:mod:`kdwatch.collector.contract`, applied to a record batch at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kdwatch.collector.columns import (
    AUDIT_CODE,
    BATCH_ROWS,
    Block,
    check_schema,
    float_column,
    int_column,
    null_mask,
    present,
    string_column,
    string_keys,
    to_numpy,
)
from kdwatch.collector.contract import (
    MAX_CLASSES,
    MAX_STRING_CHARS,
    MAX_TS_MS,
    MIN_TS_MS,
    PROB_SUM_TOLERANCE,
    decode_generation,
)
from kdwatch.errors import ContractError, SchemaError


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


def _group_matrix(k: int, group: np.ndarray, columns: tuple[tuple[pa.Array | None, np.ndarray, bool], ...],
                  rej: Rejections) -> tuple[np.ndarray, np.ndarray]:
    """The (n, k) matrix of the values of the rows in ``group`` (NaN elsewhere), and which of them sent logits.

    ``columns``: (probs or logits column, rows that sent it, is logits). Null elements are rejected
    as ``wrong_type``. A group that is the whole batch and one column takes the decoded values as they are.
    """
    n = len(group)
    matrix = None if bool(group.all()) else np.full((n, k), np.nan)
    logits_rows = np.zeros(n, bool)
    for col, has, is_logits in columns:
        rows = group & has
        if col is None or not rows.any():
            continue
        every = bool(rows.all())
        flat = pc.list_flatten(col if every else col.filter(pa.array(rows)))
        if not pa.types.is_float64(flat.type):
            flat = pc.cast(flat, pa.float64())
        if flat.null_count:
            wrong = np.zeros(n, bool)
            wrong[rows] = to_numpy(pc.is_null(flat)).reshape(-1, k).any(axis=1)
            rej.flag(wrong, "wrong_type")
            flat = pc.fill_null(flat, np.nan)
        values = to_numpy(flat).reshape(-1, k)
        if every:
            matrix = values
        else:
            if matrix is None:
                matrix = np.full((n, k), np.nan)
            matrix[rows] = values
        if is_logits:
            logits_rows |= rows
    assert matrix is not None
    return matrix, logits_rows


def _distribution(batch: pa.RecordBatch, rej: Rejections, generative: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Validated (probs, logp) as (n, K_max) matrices, NaN beyond each row's class count; None when no row is valid.

    ``generative`` rows carry a generation instead: their class count is 0 (NaN rows).

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
    has_p = np.zeros(n, bool) if probs_col is None else ~null_mask(probs_col)
    has_l = np.zeros(n, bool) if logits_col is None else ~null_mask(logits_col)
    rej.flag(has_p.astype(np.int8) + has_l + generative != 1, "probs_or_logits")
    lengths = np.zeros(n, dtype=np.int64)
    for col, has in ((probs_col, has_p), (logits_col, has_l)):
        if col is not None and has.any():
            lengths = np.where(has, to_numpy(pc.list_value_length(col)), lengths)  # null slots: masked by has
    rej.flag(~generative & ~((lengths >= 2) & (lengths <= MAX_CLASSES)), "bad_class_count")
    ok = rej.ok & ~generative
    if not ok.any():
        return (np.full((n, 0), np.nan) if rej.ok.any() else None), None  # generative rows only: no classes
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
        group = rej.ok & ~generative & (lengths == k)
        matrix, logits_rows = _group_matrix(k, group, ((probs_col, has_p, False), (logits_col, has_l, True)), rej)
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


def _generative(batch: pa.RecordBatch) -> np.ndarray:
    """Rows carrying a ``generation`` (a generative student's prediction or its replay)."""
    if "generation" not in batch.schema.names or pa.types.is_null(batch.schema.field("generation").type):
        return np.zeros(batch.num_rows, dtype=bool)
    return ~null_mask(batch.column("generation"))


def _generations(batch: pa.RecordBatch, rej: Rejections, rows: np.ndarray, teacher: bool) -> np.ndarray | None:
    """Each generative row's Generation, checked by the contract's own rule row by row (object array; None elsewhere).

    Generations are few and long: the decoder's per-sequence checks cost little beside their tokens.
    """
    if not rows.any():
        return None
    out = np.full(batch.num_rows, None, dtype=object)
    idx = np.flatnonzero(rows & rej.ok)
    values = batch.column("generation").take(pa.array(idx, type=pa.int64())).to_pylist()
    bad: dict[str, list[int]] = {}
    for i, value in zip(idx.tolist(), values, strict=True):
        try:
            out[i] = decode_generation({"generation": value}, teacher)
        except ContractError as exc:
            bad.setdefault(exc.reason, []).append(i)
    for reason, where in bad.items():
        mask = np.zeros(batch.num_rows, dtype=bool)
        mask[where] = True
        rej.flag(mask, reason)
    return out


def class_counts(probs: np.ndarray) -> np.ndarray:
    """Each row's class count (its probabilities are NaN beyond it)."""
    return (~np.isnan(probs)).sum(axis=1)


def trim(block: Block) -> Block:
    """The block with its matrices cut to its widest class count (rows of fewer classes stay NaN-padded)."""
    if block.probs is None or not block.n or not block.probs.shape[1] or not np.isnan(block.probs[:, -1]).any():
        return block  # every row fills the widest class count
    k = int(class_counts(block.probs).max())
    if k == block.probs.shape[1]:
        return block
    return replace(block, probs=block.probs[:, :k], logp=None if block.logp is None else block.logp[:, :k])


def row_classes(block: Block, rows: np.ndarray) -> np.ndarray:
    """The class count of each of ``rows`` (a block of predictions or replays)."""
    assert block.probs is not None
    if not block.probs.size or not np.isnan(block.probs[rows, -1]).any():  # every row fills the width
        return np.full(len(rows), block.probs.shape[1], dtype=np.int64)
    return class_counts(block.probs[rows])


def row_lengths(block: Block, rows: np.ndarray) -> np.ndarray:
    """The generation length of each of ``rows`` (0: a classifier's row)."""
    if block.gen is None:
        return np.zeros(len(rows), dtype=np.int64)
    return np.fromiter((0 if g is None else g.length for g in block.gen[rows]), dtype=np.int64, count=len(rows))


def _features(batch: pa.RecordBatch, rej: Rejections) -> dict[str, np.ndarray]:
    """Feature columns: float64 (NaN: missing) or object (None: missing)."""
    if "features" not in batch.schema.names or pa.types.is_null(batch.schema.field("features").type):
        return {}
    col = batch.column("features")
    outer_missing = null_mask(col)
    out: dict[str, np.ndarray] = {}
    for i, sub in enumerate(col.type):
        child = pc.struct_field(col, [i])
        st = sub.type
        if pa.types.is_null(st):
            continue
        if pa.types.is_string(st) or pa.types.is_large_string(st):
            missing = null_mask(child) | outer_missing
            values = np.array(child.to_pylist(), dtype=object)
            length = to_numpy(pc.fill_null(pc.utf8_length(child), 0))
            rej.flag(~missing & (length > MAX_STRING_CHARS), "string_too_long")
            values[missing] = None
        else:
            values, missing = float_column(child)
            if outer_missing.any():
                missing = missing | outer_missing
                values = np.where(outer_missing, np.nan, values)
            rej.flag(~missing & ~np.isfinite(values), "not_finite")
        out[sub.name] = values
    return out


# A rejected prediction that names its window: model, student_version, ts, merge key, row number.
Hint = tuple[str, str, int, int, int]


def _prediction_fields(batch: pa.RecordBatch, rej: Rejections, probs: np.ndarray | None, label: np.ndarray,
                       label_missing: np.ndarray, generative: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], pa.Array]:
    """A prediction's own fields, checked in the decoder's order: (latency, audit code, features, segment)."""
    n = batch.num_rows
    if "latency_ms" in batch.schema.names and not pa.types.is_null(batch.schema.field("latency_ms").type):
        latency, lat_missing = float_column(batch.column("latency_ms"))
        rej.flag(~lat_missing & (~np.isfinite(latency) | (latency < 0)), "bad_latency")
    else:
        latency = np.full(n, np.nan)
    rej.flag(~label_missing & ((label < 0) | (label >= MAX_CLASSES)), "label_out_of_range")
    rej.flag(~label_missing & generative, "generative_mismatch")  # a generative prediction carries no label
    if probs is not None and not label_missing.all():
        rej.flag(~label_missing & (label >= class_counts(probs)), "label_out_of_range")
    audit_values, audit_missing, _len = string_column(batch, "audit")
    audit = np.zeros(n, dtype=np.int8)
    for text, code in AUDIT_CODE.items():
        audit[to_numpy(pc.equal(audit_values, text)) & ~audit_missing] = code
    rej.flag(~audit_missing & (audit == 0), "bad_audit")
    rej.flag((audit > 0) & label_missing & ~generative, "missing_field")
    features = _features(batch, rej)
    seg = string_column(batch, "segment")
    _check_string(rej, seg, False)
    return latency, audit, features, seg[0]


def validate(batch: pa.RecordBatch, kind: str, keys: bool = True, row0: int = 0, key0: int = -1,
             generations: np.ndarray | None = None) -> tuple[Block | None, dict[str, int], list[Hint], int]:
    """(valid rows, rejected count per reason, rejected predictions naming a window, merge key after the batch).

    ``keys=False`` leaves the join keys out (zeros): a reference is never joined. ``row0`` is the
    batch's first row number in its file and ``key0`` the merge key before it: the merge of the
    inputs orders rows by their file's running maximum of ``ts`` (an unreadable ``ts`` counts as -1),
    which is exactly the order in which a heap merge of the files reads them (collector.merge).

    The window hint mirrors collector.ingest: a rejected prediction whose model, student_version and
    ts are readable is counted in that window's ``n_rejected``. The caller knows the window size, so
    the keys here hold the event time itself in the window_start place. ``generations``: each row's
    decoded Generation (None: a classifier's row), when the rows were decoded already; else a
    ``generation`` column is checked here row by row.
    """
    n = batch.num_rows
    rej = Rejections(n)
    v, v_missing = int_column(batch, "v")
    rej.flag(~v_missing & (v != 1), "unsupported_version")
    request_id = string_column(batch, "request_id")
    model = string_column(batch, "model")
    version_name = {"prediction": "student_version", "teacher": "teacher_version", "label": None}[kind]
    version = string_column(batch, version_name) if version_name else None
    ts, ts_missing = int_column(batch, "ts")
    ts_ok = ~ts_missing & (ts >= MIN_TS_MS) & (ts < MAX_TS_MS)
    _check_string(rej, request_id, True)
    _check_string(rej, model, True)
    label, label_missing = int_column(batch, "label")
    if kind == "label":
        rej.flag(label_missing, "missing_field")
        rej.flag(~label_missing & ((label < 0) | (label >= MAX_CLASSES)), "label_out_of_range")
    if version is not None:
        _check_string(rej, version, True)
    rej.flag(ts_missing, "missing_field")
    rej.flag(~ts_missing & ~ts_ok, "timestamp_out_of_range")
    probs = logp = gen = None
    latency = audit = segment = None
    features: dict[str, np.ndarray] = {}
    # ``generations``: decoded already (collector.jsonl_columns.by_line), a Generation or None per row.
    generative = present(generations, n) if generations is not None else _generative(batch)
    if kind != "label":
        probs, logp = _distribution(batch, rej, generative)
        gen = generations if generations is not None else _generations(batch, rej, generative, kind == "teacher")
    if kind == "prediction":
        latency, audit, features, segment = _prediction_fields(batch, rej, probs, label, label_missing, generative)
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
        np.where(label_missing, -1, label), latency, audit, segment, features, gen=gen, mkey=mkey, rowno=rowno)
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
