"""The columnar join buffer: open predictions kept in the chunks they came in, looked up by 64-bit key."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from kdwatch.collector.columns import Block, concat, is_range, to_numpy


@dataclass(frozen=True)
class KeyIndex:
    """A hash table of join keys, built once per chunk, so later steps' replays and labels find their rows.

    pandas' Index keeps its hash table once built (the lookups of 65,536 keys: ~1 ms; pyarrow's
    index_in rebuilds its table on every call, numpy's searchsorted misses the cache). ``unique`` is
    False when two of the chunk's request_ids share a key: its lookups then compare strings.
    """

    index: pd.Index
    unique: bool

    @classmethod
    def of(cls, keys: np.ndarray) -> KeyIndex:
        index = pd.Index(keys)
        return cls(index, bool(index.is_unique))

    def find(self, keys: np.ndarray, offset: int, n: int) -> np.ndarray:
        """Row (minus ``offset``) of each key among rows ``offset .. offset + n`` of the indexed ones; -1: absent."""
        assert self.unique
        if not keys.size:
            return np.full(0, -1, dtype=np.int64)
        rows = self.index.get_indexer(keys).astype(np.int64)
        local = rows - offset
        return np.where((rows >= 0) & (local >= 0) & (local < n), local, -1)


@dataclass
class OpenRows:
    """Predictions of one model not yet closed, with what has joined them, row for row."""

    preds: Block
    starts: np.ndarray  # each row's window start
    teacher_probs: np.ndarray  # (n, K); NaN rows: no replay yet
    teacher_logp: np.ndarray | None  # (n, K) log-softmax of replays sent as logits (NaN rows otherwise); None: none were
    teacher_version: np.ndarray  # object; None: no replay
    has_teacher: np.ndarray
    label_joined: np.ndarray  # a label that came as its own record (-1: none)
    teacher_gen: np.ndarray | None = None  # object: a generative replay's Generation per row; None: none were
    # The key index of the rows this chunk was sliced from, and where it starts in them (built when first used).
    index: KeyIndex | None = None
    index_offset: int = 0
    seq: int | None = None  # where the Kafka collector stored the chunk these rows belong to (None: not yet)

    def find(self, values: Block) -> np.ndarray:
        """This chunk's row of each request_id of ``values`` (-1: none); matches confirmed on the strings."""
        if self.index is None:
            self.index, self.index_offset = KeyIndex.of(self.preds.key), 0
        if not self.index.unique:
            return by_string(values.request_id, self.preds.request_id)
        return confirm(values, self.preds, self.index.find(values.key, self.index_offset, self.n))

    def rows_with(self, keys: np.ndarray) -> np.ndarray:
        """This chunk's rows whose join key is one of ``keys`` (hashes only: callers compare the strings)."""
        if self.index is None:
            self.index, self.index_offset = KeyIndex.of(self.preds.key), 0
        if not self.index.unique:
            return np.flatnonzero(np.isin(self.preds.key, keys))
        at = self.index.find(keys, self.index_offset, self.n)
        return np.unique(at[at >= 0])

    @classmethod
    def new(cls, preds: Block, starts: np.ndarray, k: int) -> OpenRows:
        n = preds.n
        return cls(preds, starts, np.full((n, k), np.nan), None, np.full(n, None, dtype=object),
                   np.zeros(n, dtype=bool), np.full(n, -1, dtype=np.int64))

    @property
    def n(self) -> int:
        return self.preds.n

    def set_teacher(self, rows: np.ndarray, teacher: Block) -> None:
        assert teacher.probs is not None
        self.put_teacher(rows, teacher.probs, teacher.logp, teacher.version.to_pylist(), teacher.gen)

    def put_teacher(self, rows: np.ndarray, probs: np.ndarray, logp: np.ndarray | None, versions: list[str],
                    gen: np.ndarray | None = None) -> None:
        """Replays of ``rows`` (each of its prediction's class count: padding columns only differ in width)."""
        width = self.teacher_probs.shape[1]
        self.teacher_probs[rows] = fit_width(probs, width)
        if gen is not None:
            if self.teacher_gen is None:
                self.teacher_gen = np.full(self.n, None, dtype=object)
            self.teacher_gen[rows] = gen
        if logp is not None:
            if self.teacher_logp is None:
                self.teacher_logp = np.full(self.teacher_probs.shape, np.nan)
            self.teacher_logp[rows] = fit_width(logp, width)
        self.teacher_version[rows] = np.array(versions, dtype=object)
        self.has_teacher[rows] = True

    def take(self, idx: np.ndarray) -> OpenRows:
        """The rows at ``idx`` (views when they are a contiguous range)."""
        if idx.size and is_range(idx):
            return self.slice(int(idx[0]), int(idx[-1]) + 1)
        return OpenRows(self.preds.take(idx), self.starts[idx], self.teacher_probs[idx],
                     None if self.teacher_logp is None else self.teacher_logp[idx], self.teacher_version[idx],
                     self.has_teacher[idx], self.label_joined[idx],
                     None if self.teacher_gen is None else self.teacher_gen[idx], seq=self.seq)

    def slice(self, begin: int, end: int) -> OpenRows:
        return OpenRows(self.preds.slice(begin, end), self.starts[begin:end], self.teacher_probs[begin:end],
                     None if self.teacher_logp is None else self.teacher_logp[begin:end],
                     self.teacher_version[begin:end], self.has_teacher[begin:end], self.label_joined[begin:end],
                     None if self.teacher_gen is None else self.teacher_gen[begin:end],
                     self.index, self.index_offset + begin, self.seq)


def fit_width(matrix: np.ndarray, width: int) -> np.ndarray:
    """A class-probability matrix cut or NaN-padded to ``width`` columns (the columns beyond a row's classes are NaN)."""
    if matrix.shape[1] == width:
        return matrix
    if matrix.shape[1] > width:
        return matrix[:, :width]
    return np.pad(matrix, ((0, 0), (0, width - matrix.shape[1])), constant_values=np.nan)


def concat_open(parts: list[OpenRows]) -> OpenRows:
    if len(parts) == 1:
        return parts[0]
    width = max(p.teacher_probs.shape[1] for p in parts)  # a model whose class count changed: the widest
    logp = None
    if any(p.teacher_logp is not None for p in parts):
        logp = np.concatenate([np.full((p.n, width), np.nan) if p.teacher_logp is None else fit_width(p.teacher_logp, width)
                               for p in parts])
    gen = None
    if any(p.teacher_gen is not None for p in parts):
        gen = np.concatenate([np.full(p.n, None, dtype=object) if p.teacher_gen is None else p.teacher_gen for p in parts])
    return OpenRows(concat([p.preds for p in parts]), np.concatenate([p.starts for p in parts]),
                 np.concatenate([fit_width(p.teacher_probs, width) for p in parts]), logp,
                 np.concatenate([p.teacher_version for p in parts]), np.concatenate([p.has_teacher for p in parts]),
                 np.concatenate([p.label_joined for p in parts]), gen)


# Open predictions are kept as the chunks they arrived in (closing a window slices them instead of
# copying the rest); past this many chunks of one model they are joined into one.
MAX_CHUNKS = 8


@dataclass
class JoinBuffer:
    """Rows of one model still open: predictions with what joined them, early replays and labels."""

    chunks: list[OpenRows] = field(default_factory=list)
    early_teacher: Block | None = None
    early_label: Block | None = None



def lookup(values: Block, universe: Block) -> np.ndarray:
    """The row of ``universe`` with each request_id of ``values`` (-1: none).

    Keys are matched by a hash lookup on 64-bit integers and every match is confirmed on the strings.
    """
    index = KeyIndex.of(universe.key)
    if not index.unique:
        return by_string(values.request_id, universe.request_id)
    return confirm(values, universe, index.find(values.key, 0, universe.n))


def confirm(values: Block, universe: Block, at: np.ndarray) -> np.ndarray:
    """``at`` with each key match (``at`` >= 0) that is another request_id (a shared 64-bit key, about 1 in 10^13
    for a million open requests) looked up again by its string."""
    hit = np.flatnonzero(at >= 0)
    if hit.size:
        same = to_numpy(pc.equal(values.request_id.take(pa.array(hit)), universe.request_id.take(pa.array(at[hit]))))
        if not same.all():
            other = hit[~same]
            at = at.copy()
            at[other] = by_string(values.request_id.take(pa.array(other)), universe.request_id)
    return at


def by_string(values: pa.Array, universe: pa.Array) -> np.ndarray:
    """The row of ``universe`` holding each string of ``values`` (-1: none): Arrow's hash of the strings themselves."""
    found = pc.index_in(values, value_set=universe)
    return np.asarray(pc.fill_null(found, -1).to_numpy(zero_copy_only=False), dtype=np.int64)


def first_duplicate(values: pa.Array) -> str | None:
    if len(values) < 2:
        return None
    counts = pc.value_counts(values)
    many = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    return None if len(many) == 0 else str(many.field("values")[0])


def duplicate(block: Block) -> str | None:
    """A request_id the block holds twice, if any."""
    if block.n < 2:
        return None
    keys = np.sort(block.key)
    if not (keys[1:] == keys[:-1]).any():
        return None
    return first_duplicate(block.request_id)  # None: two request_ids sharing a key
