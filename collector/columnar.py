"""The columnar engine: `kdwatch analyze` on JSONL and Parquet, and `kdwatch collect` (collector.live_columns).

The files hold the event contract as columns (README, "Parquet input"): one row per event, the
contract's field names as column names, ``ts`` as int64 epoch milliseconds or an Arrow timestamp,
``probs`` / ``logits`` as lists of numbers, ``features`` as a struct of numeric or string fields.
A column the contract does not know, or of a type it cannot hold, fails the whole file at once,
naming the column.

Rows are validated with the same rules, in the same order and with the same reason codes as
:mod:`collector.contract`, but over whole columns. The three files are then read in the order of
collector.merge (by event time; a file out of order as a heap merge reads it, i.e. by the file's
running maximum of ``ts``), a stretch at a time, and each record arrives with the watermark it would
see there, one record at a time. The rules are the README's ("Join and windows"), with the watermark
moving after every record: the least newest event time of the inputs still being read
(collector.merge.watermark_candidate); a window closes at ``start + size + grace``; a replay or label joins its prediction when
both arrive before the prediction's window closes (one that comes first waits while its own window
is open); predictions of closed windows are late; replays or labels left without a prediction when
their own window closes are unmatched. So the result depends on the events and their order in each
file, not on batch sizes. Joins look up 64-bit hashes of ``request_id`` (each match confirmed on the
strings); each window's state is computed once, when the watermark closes it. Memory: about one
batch per input plus the open windows.

Duplicates (a ``request_id`` repeated while the first is open, partners for audit records, a label
record for a prediction that carried its own) are decided first, row by row for the few request_ids
involved (:mod:`collector.column_repeats`), and so are a prediction's ``request_id`` used again after
the first one's window closed, and the predictions of a window where a generative student's and a
classifier's meet (the first accepted one sets the window's kind; the others are rejected as
``generative_mismatch``). A model's events may have different class counts: matrices are as wide as
the widest, NaN beyond each row's classes (a generative student's rows have none: their generations
are object columns); a replay joins only a prediction of its kind and class count or length, a label
only a classifier's prediction that has its class (else rejected with the contract's reason), and a
window of several class counts computes its metrics per class count (analyzer.window's rule). Two
request_ids sharing a 64-bit join key are told apart by their strings. There is no other engine: a
broken rule of the engine's own bookkeeping raises InvariantError (a bug, never the data).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from functools import cached_property
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kdwatch.analyzer.drift import Reference
from kdwatch.analyzer.window import WindowState
from kdwatch.collector.column_join import MAX_CHUNKS, JoinBuffer, OpenRows, concat_open, duplicate, lookup
from kdwatch.collector.column_repeats import find_repeats, without
from kdwatch.collector.column_rules import Batch, Hint, read_blocks, row_classes, row_lengths, trim
from kdwatch.collector.column_windows import transfer_sample, window_state
from kdwatch.collector.columns import NEVER, ORDER, Block, InvariantError, concat, distinct, is_parquet, to_numpy
from kdwatch.collector.parquet_io import prefetch
from kdwatch.collector.records import INPUTS, TransferRecord, WindowKey

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
        self.buffers: dict[str, JoinBuffer] = {}
        # Counts of windows still open, added to their state when they close: n_rejected, n_duplicate (column_repeats).
        self.pending: dict[WindowKey, Counter[str]] = {}
        self.windows: dict[WindowKey, WindowState] = {}  # final states
        self.counters: Counter[tuple[str, str]] = Counter()
        self.merged = 0  # rows of the merge stepped so far
        self.step_watermark = NEVER
        # The Kafka collector's needs (collector.live_columns), off for files: each row that goes to
        # the dead-letter topic as (kind, row numbers, reason), late predictions per closed window,
        # joins into buffered rows (persisted as patches) and the transfer set's sample.
        self.track = False
        self.letters: list[tuple[str, np.ndarray, str]] = []
        self.late: Counter[WindowKey] = Counter()
        self.joins: list[tuple[str, np.ndarray, np.ndarray, Block]] = []  # (kind, starts, prediction rows, partners)
        self.transfer_per_window = 0
        self.transfer: list[TransferRecord] = []

    @cached_property
    def references(self) -> References:
        source = self._references
        return (source() if callable(source) else source) or {}

    @cached_property
    def fingerprints(self) -> dict[str, str]:
        return {m: r.fingerprint for m, r in self.references.items()}

    def _closed(self, start: np.ndarray | int, watermark: int | None = None) -> Any:
        watermark = self.watermark if watermark is None else watermark
        if watermark is None:
            return np.zeros_like(start, dtype=bool) if isinstance(start, np.ndarray) else False
        return start + self.window_ms + self.grace_ms <= watermark

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
                self._count(WindowKey(m, ver, start), "n_rejected", 1)
        models: set[str] = set()
        for block in present.values():
            models.update(distinct(block.model))
        for model in sorted(models):
            parts = [present.get(kind) for kind in INPUTS]
            self._step_model(model, *(None if b is None else trim(b if len(models) == 1 else b.take(b.rows_of(model)))
                                      for b in parts))

    def _arrivals(self, blocks: dict[str, Block], hints: list[Hint], ends: dict[str, tuple[int, int]]) -> np.ndarray:
        """Each row's position in the merge and the watermark when it arrived (``position``, ``arrival_wm``).

        The watermark moves after every record: the least, over the inputs whose file has not ended
        yet, of the newest event time seen (collector.merge.watermark_candidate's rule),
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
        buf = self.buffers.setdefault(model, JoinBuffer())
        if preds is not None and preds.n:
            preds = self._drop_late(model, preds)
        blocks = [preds, teacher, labels]
        cut = self._join(model, buf, *blocks)
        if cut is not None:
            self._join_around_reuses(model, buf, blocks, cut)

    def _join_around_reuses(self, model: str, buf: JoinBuffer, blocks: list[Block | None], cut: tuple[int, int] | None) -> None:
        """Join a stretch in which a prediction's request_id comes again after the first one's window closed.

        At each such prediction (``cut``: its merge position and watermark) what came before it is joined, this
        model's windows closed by then are closed (the first prediction goes, as in a record-by-record join), and the
        rest follows, SPLIT_ROWS merge positions at a time: ids reused over and over cost that much each.
        """
        while True:
            if cut is not None:
                position, watermark = cut
                again = self._join(model, buf, *_before(blocks, position))
                assert again is None  # nothing is reused before the first reuse
                self._close(model, buf, False, watermark)  # this model's only: the others' steps see their own
                blocks = _before(blocks, position, after=True)
            left = [int(b.position[0]) for b in blocks if b is not None and b.n and b.position is not None]
            if not left:
                return
            limit = min(left) + SPLIT_ROWS
            cut = self._join(model, buf, *_before(blocks, limit))
            if cut is None:
                blocks = _before(blocks, limit, after=True)

    def _drop_late(self, model: str, preds: Block) -> Block:
        """The predictions whose window was open when they arrived; the others counted and dead-lettered as late."""
        assert preds.arrival_wm is not None
        starts = self._starts(preds.ts)
        late = starts + self.window_ms + self.grace_ms <= preds.arrival_wm
        if not late.any():
            return preds
        self.counters[("prediction", "late")] += int(late.sum())
        late_versions = preds.version.take(pa.array(np.flatnonzero(late), type=pa.int64())).to_pylist()
        for ver, start in zip(late_versions, starts[late].tolist(), strict=True):
            if self.track:  # its window was stored when it closed
                self.late[WindowKey(model, ver, start)] += 1
            else:
                self.windows.setdefault(WindowKey(model, ver, start), WindowState()).n_late += 1
        self._letter("prediction", preds, np.flatnonzero(late), "late")
        return preds.take(np.flatnonzero(~late))

    def _join(self, model: str, buf: JoinBuffer, preds: Block | None, teacher: Block | None, labels: Block | None
              ) -> tuple[int, int] | None:
        """Join one stretch of a model's rows (predictions not late); or, before any change, the (merge position,
        watermark) of a prediction reusing a request_id whose first window has closed (collector.column_repeats)."""
        present = {kind: b for kind, b in (("prediction", preds), ("teacher", teacher), ("label", labels))
                   if b is not None and b.n}
        repeats = find_repeats(model, buf, present, self.window_ms, self.grace_ms) if present else None
        if repeats is not None and repeats.reused is not None:
            return repeats.reused
        if repeats is not None:
            self.counters.update(repeats.counters)
            if self.track:
                for kind, where, row, reason in repeats.letters:
                    block = present[kind] if where == "step" else (buf.early_teacher if kind == "teacher" else buf.early_label)
                    self._letter(kind, block, np.array([row]), reason)
            for key, count in repeats.windows.items():
                self._count(key, "n_duplicate", count)
            for key, count in repeats.rejected.items():
                self._count(key, "n_rejected", count)
            preds = without(preds, repeats.drop["prediction"])
            teacher, labels = without(teacher, repeats.drop["teacher"]), without(labels, repeats.drop["label"])
            buf.early_teacher = without(buf.early_teacher, repeats.drop_early["teacher"])
            buf.early_label = without(buf.early_label, repeats.drop_early["label"])
        if preds is not None and preds.n:
            self._add_predictions(model, buf, preds, self._starts(preds.ts))
        if teacher is not None and teacher.n:
            self._add_partners(model, buf, teacher, "teacher")
        if labels is not None and labels.n:
            self._add_partners(model, buf, labels, "label")
        return None

    def _add_predictions(self, model: str, buf: JoinBuffer, preds: Block, starts: np.ndarray) -> None:
        dup = duplicate(preds)  # repeats against the buffer were decided by collector.column_repeats
        if dup is not None:
            raise InvariantError(f"prediction request_id {dup[:80]!r} of model {model!r} appears twice")
        assert preds.arrival_wm is not None
        assert preds.probs is not None
        chunk = OpenRows.new(preds, starts, preds.probs.shape[1])
        # Replays and labels of earlier steps join now, if their own window was still open.
        for kind in ("teacher", "label"):
            early = buf.early_teacher if kind == "teacher" else buf.early_label
            if early is None or not early.n:
                continue
            at = lookup(early, preds)
            matched = at >= 0
            matched[matched] &= self._starts(early.ts[matched]) + self.window_ms + self.grace_ms > preds.arrival_wm[at[matched]]
            assert preds.audit is not None
            matched[matched] &= preds.audit[at[matched]] == 0  # an audit record joins nothing: its partners wait
            if not matched.any():
                continue
            consumed = matched.copy()  # a replay or label of another class count: rejected, not joined (README)
            matched[matched] = ~self._misfits(kind, early, np.flatnonzero(matched), preds, at[matched])
            rows = at[matched]
            partners = early.take(np.flatnonzero(matched))
            self._check_partner(model, preds, rows, partners, kind)
            rest = early.take(np.flatnonzero(~consumed))
            if kind == "teacher":
                chunk.set_teacher(rows, partners)
                buf.early_teacher = rest
            else:
                assert partners.label is not None
                chunk.label_joined[rows] = partners.label
                buf.early_label = rest
        buf.chunks.append(chunk)
        if self.track:  # each row rewritten O(log n) times when persisted (collector.live_columns)
            while len(buf.chunks) > 1 and buf.chunks[-2].n <= 2 * buf.chunks[-1].n:
                buf.chunks[-2:] = [concat_open(buf.chunks[-2:])]
        elif len(buf.chunks) > MAX_CHUNKS:
            buf.chunks = [concat_open(buf.chunks)]

    def _misfits(self, kind: str, block: Block, rows: np.ndarray, preds: Block, at: np.ndarray) -> np.ndarray:
        """Which of the replay or label ``rows`` about to join the predictions at ``at`` do not fit them (the README's
        rules): a generative replay for a classifier's prediction or the other way round, or a label for a
        generative one (``generative_mismatch``), a replay scoring another number of tokens
        (``generation_length_mismatch``) or of another class count (``class_count_mismatch``), a label outside the
        classes (``label_out_of_range``). Those are rejected (counted and dead-lettered) and join nothing; the
        prediction takes another."""
        classes = row_classes(preds, at)
        generative = classes == 0
        masks: dict[str, np.ndarray] = {}
        if kind == "label":
            assert block.label is not None
            masks["generative_mismatch"] = generative
            masks["label_out_of_range"] = ~generative & (block.label[rows] >= classes)
        else:
            theirs = row_classes(block, rows)
            same_kind = (theirs == 0) == generative
            masks["generative_mismatch"] = ~same_kind
            masks["class_count_mismatch"] = same_kind & (theirs != classes)
            if generative.any():
                masks["generation_length_mismatch"] = same_kind & generative & (row_lengths(block, rows) != row_lengths(preds, at))
        bad = np.zeros(rows.size, dtype=bool)
        for why, mask in masks.items():
            if mask.any():
                self.counters[(kind, why)] += int(mask.sum())
                self._letter(kind, block, rows[mask], why)
                bad |= mask
        return bad

    def _check_partner(self, model: str, preds: Block, rows: np.ndarray, partners: Block, kind: str) -> None:
        """What collector.column_repeats leaves to the vectorised join holds (else InvariantError: a bug)."""
        assert preds.audit is not None and preds.label is not None
        if (preds.audit[rows] > 0).any():
            raise InvariantError(f"a {kind} record for an audit prediction of model {model!r}")
        if kind == "label" and (preds.label[rows] >= 0).any():
            raise InvariantError(f"a label record for a prediction of model {model!r} that carried its own label")

    def _add_partners(self, model: str, buf: JoinBuffer, block: Block, kind: str) -> None:
        assert block.arrival_wm is not None and block.position is not None
        span = self.window_ms + self.grace_ms
        # Open at its own arrival: else it is late, whatever else it would have joined.
        own_open = self._starts(block.ts) + span > block.arrival_wm
        early = buf.early_teacher if kind == "teacher" else buf.early_label
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
            assert p.audit is not None
            joins &= p.audit[rows] == 0  # an audit record joins nothing: one that came first goes on waiting
            pending = np.concatenate([pending[~found], who[~joins]])  # found but closed: as if absent
            pending.sort()
            if not joins.any():
                continue
            rows, who = rows[joins], who[joins]
            fits = ~self._misfits(kind, block, who, p, rows)
            rows, who = rows[fits], who[fits]
            if not who.size:
                continue
            partners = block.take(who)
            self._check_partner(model, p, rows, partners, kind)
            if kind == "teacher":
                if chunk.has_teacher[rows].any():
                    raise InvariantError(f"a second teacher replay for a request of model {model!r}")
                chunk.set_teacher(rows, partners)
            else:
                if (chunk.label_joined[rows] >= 0).any():
                    raise InvariantError(f"a second label for a request of model {model!r}")
                assert partners.label is not None
                chunk.label_joined[rows] = partners.label
            if self.track:
                assert p.rowno is not None
                self.joins.append((kind, chunk.starts[rows], p.rowno[rows], partners))
        if pending.size:
            late = ~own_open[pending]
            if late.any():
                self.counters[(kind, "late")] += int(late.sum())
                self._letter(kind, block, pending[late], "late")
            waiting = pending[~late]
            if waiting.size:
                rest = block.take(waiting)
                self._check_unique(model, rest, early, kind)
                merged = rest if early is None or not early.n else concat([early, rest])
                if kind == "teacher":
                    buf.early_teacher = merged
                else:
                    buf.early_label = merged

    @staticmethod
    def _check_unique(model: str, rows: Block, early: Block | None, kind: str) -> None:
        """Rows about to wait are unique and not waiting already (collector.column_repeats took the duplicates)."""
        dup = duplicate(rows)
        if dup is None and early is not None and early.n:
            hits = lookup(rows, early)
            if (hits >= 0).any():
                dup = str(rows.request_id[int(np.argmax(hits >= 0))].as_py())
        if dup is not None:
            raise InvariantError(f"{kind} request_id {dup[:80]!r} of model {model!r} waits twice")

    def advance(self, close_all: bool = False) -> None:
        """Move the watermark to where the last step left it and compute every window it closes."""
        if self.step_watermark != NEVER and (self.watermark is None or self.step_watermark > self.watermark):
            self.watermark = self.step_watermark
        for model, buf in self.buffers.items():
            self._close(model, buf, close_all)
        for key in sorted(self.pending):
            if close_all or self._closed(key.window_start):
                self._settle(key, self.windows.setdefault(key, WindowState()))

    def _letter(self, kind: str, block: Block | None, rows: np.ndarray, reason: str) -> None:
        if self.track and block is not None and rows.size:
            assert block.rowno is not None
            self.letters.append((kind, block.rowno[rows], reason))

    def _count(self, key: WindowKey, field: str, count: int) -> None:
        self.pending.setdefault(key, Counter())[field] += count

    def _settle(self, key: WindowKey, state: WindowState) -> None:
        """Add the counts the window gathered while open (``pending``) to its state."""
        for field, count in self.pending.pop(key, {}).items():
            setattr(state, field, getattr(state, field) + count)

    def _close(self, model: str, buf: JoinBuffer, everything: bool, watermark: int | None = None) -> None:
        for kind in ("teacher", "label"):
            early = buf.early_teacher if kind == "teacher" else buf.early_label
            if early is None or not early.n:
                continue
            gone = np.ones(early.n, bool) if everything else self._closed(self._starts(early.ts), watermark)
            if gone.any():
                self.counters[(kind, "unmatched")] += int(gone.sum())
                self._letter(kind, early, np.flatnonzero(gone), "unmatched")
                kept = early.take(np.flatnonzero(~gone))
                if kind == "teacher":
                    buf.early_teacher = kept
                else:
                    buf.early_label = kept
        done_parts, open_parts = [], []
        for chunk in buf.chunks:
            done = np.ones(chunk.n, bool) if everything else self._closed(chunk.starts, watermark)
            if done.all():
                done_parts.append(chunk)
            elif done.any():
                done_parts.append(chunk.take(np.flatnonzero(done)))
                open_parts.append(chunk.take(np.flatnonzero(~done)))
            else:
                open_parts.append(chunk)
        buf.chunks = open_parts
        if done_parts:
            self._close_rows(model, concat_open(done_parts))

    def _close_rows(self, model: str, rows: OpenRows) -> None:
        """Compute the windows of closed rows: one state per (student_version, window)."""
        for key, window in self.window_rows(model, rows):
            state = window_state(model, window, self.references.get(model), self.fingerprints.get(model, ""))
            if self.transfer_per_window:
                self.transfer.extend(transfer_sample(model, window, self.transfer_per_window))
            self._settle(key, state)
            prior = self.windows.get(key)
            self.windows[key] = prior.merge(state) if prior is not None else state

    def window_rows(self, model: str, rows: OpenRows) -> list[tuple[WindowKey, OpenRows]]:
        """The rows of each (student_version, window), windows in event-time order."""
        encoded = pc.dictionary_encode(rows.preds.version)
        names = encoded.dictionary.to_pylist()
        codes = to_numpy(encoded.indices).astype(np.int64)
        slot = (rows.starts - rows.starts.min()) // self.window_ms
        combo = codes * (int(slot.max()) + 1) + slot
        if rows.n > 1 and bool((np.diff(combo) < 0).any()):  # group the rows of each window together
            order = np.argsort(combo, kind="stable")
            rows, combo, codes = rows.take(order), combo[order], codes[order]
        edges = [0, *(np.flatnonzero(np.diff(combo)) + 1).tolist(), rows.n]
        groups = sorted(((int(rows.starts[b]), names[codes[b]], b, e) for b, e in pairwise(edges)),
                        key=lambda item: item[0])
        return [(WindowKey(model, ver, start), rows.slice(begin, end)) for start, ver, begin, end in groups]


# After a reused request_id, the rest of a stretch is joined this many merge positions at a time.
SPLIT_ROWS = 4_096


def _before(blocks: list[Block | None], position: int, after: bool = False) -> list[Block | None]:
    """Each block's rows before merge position ``position`` (``after``: from it on)."""
    out: list[Block | None] = []
    for block in blocks:
        if block is not None and block.n:
            assert block.position is not None
            block = block.take(np.flatnonzero((block.position >= position) if after else (block.position < position)))
        out.append(block)
    return out


def analyze_columnar(
    predictions: Path,
    teacher: Path | None = None,
    labels: Path | None = None,
    *,
    window_ms: int = 60_000,
    grace_ms: int = 600_000,
    references: References | Callable[[], References] | None = None,
) -> tuple[dict[WindowKey, WindowState], dict[tuple[str, str], int]]:
    """Final window states and per-(kind, reason) counters of JSONL or Parquet files.

    The inputs are read as collector.merge orders a co-partition's records (by event
    time, ties by input and row; a file out of order is merged as a heap merge would, which is the
    order of the file's running maximum of ``ts``), in stretches: each step takes every row before
    the least merge key read so far among the files still open, reading the file that is furthest
    behind. Memory: about one batch per input plus the open windows.
    """
    from kdwatch.collector.jsonl_columns import read_jsonl_blocks

    paths = {"prediction": predictions, "teacher": teacher, "label": labels}
    readers = {kind: prefetch(read_blocks(path, kind) if is_parquet(path) else read_jsonl_blocks(path, kind))
               for kind, path in paths.items() if path is not None}
    return analyze_batches(readers, window_ms=window_ms, grace_ms=grace_ms, references=references)


def analyze_batches(
    readers: dict[str, Iterator[Batch]],
    *,
    window_ms: int,
    grace_ms: int,
    references: References | Callable[[], References] | None = None,
) -> tuple[dict[WindowKey, WindowState], dict[tuple[str, str], int]]:
    """analyze_columnar over each input's validated batches (a missing input: no key), in the merge's stretches."""
    analyzer = ColumnarAnalyzer(window_ms, grace_ms, references)
    carry: dict[str, list[Block]] = {kind: [] for kind in INPUTS}
    hints: list[Hint] = []
    read_to = dict.fromkeys(INPUTS, NEVER)  # merge key after the last row read
    ends = {kind: (NEVER, -1) for kind in INPUTS if kind not in readers}  # (merge key, row) of a file's last row

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

