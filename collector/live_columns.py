"""One co-partition of the Kafka collector on the columnar engine of `kdwatch analyze` (collector.columnar).

Each poll's records of an input partition are decoded into columns at once (collector.jsonl_columns,
the contract's rules and reason codes) and queued with their merge keys (the partition's running
maximum of event times). A step takes, from every input, the queued rows that the record-by-record
merge (collector.merge) would hand out now, which is a prefix of each queue: all rows up to the least
(last merge key, input order) among the inputs that are not idle, and only while every such input has
something queued. The engine then runs them exactly as for files, with the idle inputs counted as
ended. So the decisions (what joins, what is late, every window's fields) are those of `kdwatch
analyze` on the same events, whatever the fetch timing.

What only the live path has: event times too far ahead of the wall clock are rejected
(``future_timestamp``), every rejected, late, duplicate or unmatched record is handed back with its
source for the dead-letter topic, joined predictions are sampled into the transfer set when their
window closes, and the engine's buffer is persisted incrementally with each commit (collector.column_state).
Open windows' states so far come from ``provisional`` (the caller stores them now and then, not each commit).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdwatch.analyzer.drift import Reference
from kdwatch.analyzer.window import WindowState
from kdwatch.collector.column_join import JoinBuffer
from kdwatch.collector.column_rules import Hint, validate
from kdwatch.collector.column_state import apply_patch, chunk_blob, chunk_from, early_blob, early_from, patch_blob
from kdwatch.collector.column_windows import window_state
from kdwatch.collector.columnar import ColumnarAnalyzer
from kdwatch.collector.columns import NEVER, ORDER, Block, concat
from kdwatch.collector.contract import DECODERS
from kdwatch.collector.ingest import merge_key
from kdwatch.collector.jsonl_columns import by_line, fast_batch
from kdwatch.collector.merge import Idleness, watermark_candidate
from kdwatch.collector.records import (
    INPUTS,
    Changes,
    DeadLetter,
    EngineDelta,
    Source,
    WindowKey,
)
from kdwatch.errors import ContractError

EARLY = {"teacher": "early_teacher", "label": "early_label"}


@dataclass
class _Piece:
    """Fetched records of one input, decoded, in offset order."""

    records: list[Any]  # the Kafka client's records (topic, partition, offset, timestamp, key, value)
    offsets: np.ndarray
    mkeys: np.ndarray  # merge key of every record
    block: Block | None  # the valid rows (rowno = offset)
    hints: list[Hint]  # rejected predictions naming a window (row = offset)
    rejected: list[tuple[int, str, str]]  # (index in records, reason, message)


def decode(kind: str, records: list[Any], key0: int, future_limit_ms: int | None) -> tuple[_Piece, int]:
    """Validate a poll's records of one input on columns; (piece, merge key after it)."""
    values = [r.value or b"" for r in records]
    offsets = np.fromiter((r.offset for r in records), dtype=np.int64, count=len(records))
    batch = fast_batch(values, kind) if all(b"\n" not in v for v in values) else None
    if batch is not None:
        block, _reasons, hints, end = validate(batch, kind, row0=0, key0=key0)
        ts = batch.column("ts").to_numpy(zero_copy_only=False) if "ts" in batch.schema.names else None
        raw_ts = np.where(np.isnan(ts.astype(np.float64)), -1, ts).astype(np.int64) if ts is not None else np.full(len(values), -1)
    else:
        block, _reasons, hints, end = by_line(values, kind, 0, key0)
        raw_ts = np.array([merge_key(v)[0] for v in values], dtype=np.int64)
    mkeys = np.maximum(np.maximum.accumulate(raw_ts), key0) if len(values) else np.zeros(0, np.int64)
    valid = np.zeros(len(values), dtype=bool)
    rejected: list[tuple[int, str, str]] = []
    if block is not None:
        assert block.rowno is not None
        local = block.rowno
        valid[local] = True
        if future_limit_ms is not None:
            ahead = block.ts > future_limit_ms
            if ahead.any():
                for i, ts_ms in zip(local[ahead].tolist(), block.ts[ahead].tolist(), strict=True):
                    rejected.append((i, "future_timestamp", f"event time {ts_ms} is more than the allowed time ahead of now"))
                block = block.take(np.flatnonzero(~ahead))
                local = local[~ahead]
        block.mkey = mkeys[local]
        block.rowno = offsets[local]
    for i in np.flatnonzero(~valid).tolist():
        try:
            DECODERS[kind](values[i])
            reason, message = "invalid_json", "rejected by the columnar validator"  # pragma: no cover - the decoder agrees
        except ContractError as exc:
            reason, message = exc.reason, exc.message
        rejected.append((i, reason, message))
    rejected.sort()
    hints = [(m, v, ts, int(mkeys[row]), int(offsets[row])) for m, v, ts, _mk, row in hints]
    return _Piece(records, offsets, mkeys, block, hints, rejected), int(end)


@dataclass
class ColumnQueues:
    """Decoded, not yet processed records of one co-partition's inputs, and which inputs are idle."""

    idleness: Idleness
    pieces: dict[str, list[_Piece]] = field(default_factory=lambda: {kind: [] for kind in INPUTS})

    @property
    def inputs(self) -> tuple[str, ...]:
        return INPUTS

    def queued(self, kind: str | None = None) -> int:
        if kind is None:
            return sum(self.queued(k) for k in INPUTS)
        return sum(p.offsets.size for p in self.pieces[kind])

    def at_end(self, kind: str) -> bool:
        return self.idleness.at_end[kind]

    def set_at_end(self, kind: str, at_end: bool) -> None:
        self.idleness.update(kind, at_end, self.queued(kind))

    def idle(self) -> dict[str, bool]:
        return self.idleness.idle({kind: self.queued(kind) for kind in INPUTS})

    def ready(self, idle: dict[str, bool]) -> dict[str, int]:
        """Rows of each input the merge hands out now (see the module docstring)."""
        limit: tuple[int, int] | None = None
        for kind in INPUTS:
            if idle[kind]:
                continue
            if not self.pieces[kind]:
                return dict.fromkeys(INPUTS, 0)
            last = (int(self.pieces[kind][-1].mkeys[-1]), ORDER[kind])
            limit = last if limit is None or last < limit else limit
        counts = {}
        for kind in INPUTS:
            n = 0
            for piece in self.pieces[kind]:
                if limit is None:
                    n += piece.offsets.size
                else:
                    upto = piece.mkeys <= limit[0] if ORDER[kind] <= limit[1] else piece.mkeys < limit[0]
                    n += int(np.count_nonzero(upto))  # merge keys never decrease in a queue
            counts[kind] = n
        return counts

    def take(self, kind: str, n: int) -> list[_Piece]:
        """The first ``n`` queued rows of an input, as pieces."""
        out: list[_Piece] = []
        while n > 0:
            piece = self.pieces[kind][0]
            if piece.offsets.size <= n:
                out.append(self.pieces[kind].pop(0))
                n -= piece.offsets.size
                continue
            head, tail = _split(piece, n)
            out.append(head)
            self.pieces[kind][0] = tail
            n = 0
        return out

    def clear(self) -> None:
        for kind in INPUTS:
            self.pieces[kind].clear()
            self.idleness.since[kind] = None
            self.idleness.at_end[kind] = False


def _split(piece: _Piece, n: int) -> tuple[_Piece, _Piece]:
    """The piece's first ``n`` records and the rest."""
    cut = int(piece.offsets[n])  # the first offset of the rest
    parts = []
    for head in (True, False):
        block = piece.block
        if block is not None:
            assert block.rowno is not None
            at = int(np.searchsorted(block.rowno, cut))
            block = block.slice(0, at) if head else block.slice(at, block.n)
        hints = [h for h in piece.hints if (h[4] < cut) == head]
        rejected = [(i if head else i - n, r, m) for i, r, m in piece.rejected if (i < n) == head]
        rows = slice(0, n) if head else slice(n, None)
        parts.append(_Piece(piece.records[rows], piece.offsets[rows], piece.mkeys[rows], block, hints, rejected))
    return parts[0], parts[1]


def _source(record: Any) -> Source:
    return Source(record.topic, record.partition, record.offset, record.timestamp, record.key, record.value or b"")


class ColumnarUnit:
    """The columnar engine for one co-partition of the Kafka collector (see the module docstring)."""

    def __init__(self, partition: int, window_ms: int, grace_ms: int, references: dict[str, Reference],
                 topics: dict[str, str], idle_timeout_s: float, *, max_future_ms: int | None = 3_600_000,
                 transfer_per_window: int = 0, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.partition = partition
        self.topics = topics  # kind -> topic
        self.analyzer = ColumnarAnalyzer(window_ms, grace_ms, references)
        self.analyzer.track = True
        self.analyzer.transfer_per_window = transfer_per_window
        self.queues = ColumnQueues(Idleness(idle_timeout_s, INPUTS, monotonic))
        self.max_future_ms = max_future_ms
        self.clock = clock
        self.keys = dict.fromkeys(INPUTS, -1)  # merge key after the last queued row of each input
        self.processed = dict.fromkeys(INPUTS, -1)  # merge key after the last processed row (where a restart reads on)
        # Waiting replays and labels: offset -> (Kafka timestamp, key, value), for the dead-letter topic.
        self.waiting: dict[str, dict[int, tuple[int, bytes | None, bytes]]] = {"teacher": {}, "label": {}}
        self.seq = 0
        self.saved: set[int] = set()  # stored chunk sequence numbers
        self.saved_early: dict[tuple[str, str], Block | None] = {}

    # ---- queueing ----

    def push(self, kind: str, records: list[Any]) -> None:
        if not records:
            return
        limit = None if self.max_future_ms is None else int(self.clock() * 1000) + self.max_future_ms
        piece, self.keys[kind] = decode(kind, records, self.keys[kind], limit)
        self.queues.pieces[kind].append(piece)
        self.queues.idleness.since[kind] = None

    @property
    def buffered(self) -> int:
        """Open predictions and waiting replays and labels."""
        n = 0
        for buf in self.analyzer.buffers.values():
            n += sum(c.n for c in buf.chunks)
            n += sum(b.n for b in (buf.early_teacher, buf.early_label) if b is not None)
        return n

    # ---- a step ----

    def step(self) -> tuple[Changes, dict[str, int]]:
        """Process what the merge allows now; (changes to commit, kind -> next offset for the inputs that moved)."""
        a = self.analyzer
        idle = self.queues.idle()
        counts = self.queues.ready(idle)
        taken = {kind: self.queues.take(kind, n) for kind, n in counts.items() if n}
        before_wm, before_obs = a.watermark, dict(a.observed)
        # The watermark moves with the inputs idle now before the first record, as collector.merge's rule moves it.
        seen = {k: v for k, v in a.observed.items() if v != NEVER}
        candidate = watermark_candidate(seen, idle)
        if candidate is not None and (a.watermark is None or candidate > a.watermark):
            a.watermark = candidate
        changes = Changes()
        blocks: dict[str, Block | None] = {}
        hints: list[Hint] = []
        for kind, pieces in taken.items():
            parts = [p.block for p in pieces if p.block is not None and p.block.n]
            blocks[kind] = concat(parts) if parts else None
            for piece in pieces:
                hints.extend(piece.hints)
                for i, reason, message in piece.rejected:
                    changes.counters[(kind, reason)] += 1
                    changes.dead_letters.append(DeadLetter(_source(piece.records[i]), reason, message))
        if any(b is not None for b in blocks.values()) or hints:
            hints.sort(key=lambda h: h[4])
            a.step(blocks, hints, {k: (NEVER, -1) for k, is_idle in idle.items() if is_idle})
        a.advance()
        self._harvest(changes, taken)
        if a.watermark != before_wm:
            changes.watermark = a.watermark
        if a.observed != before_obs:
            changes.observed = {k: v for k, v in a.observed.items() if v != NEVER}
        for kind, pieces in taken.items():
            self.processed[kind] = int(pieces[-1].mkeys[-1])
        changes.engine = self._delta()
        moved = {self.topics[kind]: int(pieces[-1].offsets[-1]) + 1 for kind, pieces in taken.items()}
        return changes, moved

    def _harvest(self, changes: Changes, taken: dict[str, list[_Piece]]) -> None:
        a = self.analyzer
        changes.closed, a.windows = a.windows, {}
        for window, late in a.late.items():
            changes.late[window] += late
        a.late.clear()
        for counter, count in a.counters.items():
            changes.counters[counter] += count
        a.counters.clear()
        changes.transfer, a.transfer = a.transfer, []

        def record_at(kind: str, offset: int) -> Any:
            """The record with this offset among those processed in this step (None: an earlier one)."""
            for piece in taken.get(kind, ()):
                at = int(np.searchsorted(piece.offsets, offset))
                if at < piece.offsets.size and piece.offsets[at] == offset:
                    return piece.records[at]
            return None

        for kind, rows, reason in a.letters:
            for offset in rows.tolist():
                record = record_at(kind, offset)
                if record is not None:
                    source = _source(record)
                else:  # a replay or label that waited since an earlier step
                    ts, record_key, value = self.waiting[kind][offset]
                    source = Source(self.topics[kind], self.partition, offset, ts, record_key, value)
                changes.dead_letters.append(DeadLetter(source, reason, _MESSAGES[reason]))
        a.letters.clear()
        for kind in ("teacher", "label"):
            now = set()
            for buf in a.buffers.values():
                early = getattr(buf, EARLY[kind])
                if early is not None and early.n:
                    assert early.rowno is not None
                    now.update(early.rowno.tolist())
            kept = {o: s for o, s in self.waiting[kind].items() if o in now}
            for offset in now - kept.keys():
                r = record_at(kind, offset)
                kept[offset] = (r.timestamp, r.key, r.value or b"")
            self.waiting[kind] = kept

    def provisional(self) -> dict[WindowKey, WindowState]:
        """The open windows' states so far (what has joined until now): what `GET /windows` shows of an open window."""
        a = self.analyzer
        out: dict[WindowKey, WindowState] = {}
        for model, buf in a.buffers.items():
            for chunk in buf.chunks:  # chunk by chunk, merged (exact): no copy of the buffer
                if not chunk.n:
                    continue
                for key, rows in a.window_rows(model, chunk):
                    state = window_state(model, rows, a.references.get(model), a.fingerprints.get(model, ""))
                    prior = out.get(key)
                    out[key] = state if prior is None else prior.merge(state)
        for key, counts in a.pending.items():  # counts of open windows (rejected, duplicate records), rows or not
            state = out.setdefault(key, WindowState())
            for name, count in counts.items():
                setattr(state, name, getattr(state, name) + count)
        return out

    # ---- persistence ----

    def _delta(self) -> EngineDelta:
        a = self.analyzer
        delta = EngineDelta(meta={})
        current: set[int] = set()
        for model, buf in a.buffers.items():
            for chunk in buf.chunks:
                if chunk.seq is None:
                    chunk.seq = self._next_seq()
                    delta.put.append(("chunk", model, chunk.seq, int(chunk.starts.max()), chunk_blob(chunk)))
                current.add(chunk.seq)
            for kind, attr in EARLY.items():
                early = getattr(buf, attr)
                if self.saved_early.get((model, kind)) is early:
                    continue
                self.saved_early[(model, kind)] = early
                if early is None or not early.n:
                    delta.delete.append((kind, model, 0))
                else:
                    delta.put.append((kind, model, 0, int(a._starts(early.ts).max()), early_blob(early, self.waiting[kind])))
        for kind, starts, rows, partners in a.joins:
            model = str(partners.model[0])
            delta.put.append(("join_" + kind, model, self._next_seq(), int(starts.max()), patch_blob(kind, rows, partners)))
        a.joins.clear()
        delta.delete.extend(("chunk", "", seq) for seq in sorted(self.saved - current))
        self.saved = current
        if a.watermark is not None:
            delta.purge_through = a.watermark - a.window_ms - a.grace_ms  # patches of windows closed by now
        delta.meta = self._meta()  # last: with the sequence numbers given out above
        return delta

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _meta(self) -> dict[str, Any]:
        a = self.analyzer
        return {
            "watermark": a.watermark, "observed": a.observed, "merged": a.merged, "step_watermark": a.step_watermark,
            "keys": self.processed, "seq": self.seq,
            "pending": [[*key, dict(counts)] for key, counts in a.pending.items()],
        }

    def restore(self, meta: dict[str, Any] | None, blobs: Iterable[tuple[str, str, int, bytes]]) -> None:
        """Resume from what the last commit stored: (kind, model, seq, blob) rows, any order."""
        if meta is None:
            return
        a = self.analyzer
        a.watermark, a.merged, a.step_watermark = meta["watermark"], meta["merged"], meta["step_watermark"]
        a.observed = dict(meta["observed"])
        self.keys, self.processed = dict(meta["keys"]), dict(meta["keys"])
        self.seq = meta["seq"]
        for model, version, start, counts in meta["pending"]:
            for name, count in counts.items():
                a._count(WindowKey(model, version, start), name, count)
        patches: list[tuple[int, str, str, bytes]] = []
        for kind, model, seq, blob in blobs:
            if seq > self.seq:
                raise RuntimeError(f"partition {self.partition}: stored blob {kind} {seq} is newer than the engine's state "
                                   f"({self.seq}); the stored state is inconsistent")
            buf = a.buffers.setdefault(model, JoinBuffer())
            if kind == "chunk":
                chunk = chunk_from(blob)
                chunk.seq = seq
                self.saved.add(seq)
                buf.chunks.append(chunk)
            elif kind in EARLY:
                early, sources = early_from(blob, kind)
                setattr(buf, EARLY[kind], early)
                self.saved_early[(model, kind)] = early
                self.waiting[kind].update(sources)
            else:
                patches.append((seq, kind.removeprefix("join_"), model, blob))
        for buf in a.buffers.values():
            buf.chunks.sort(key=lambda c: c.seq or 0)
        for _seq, kind, model, blob in sorted(patches):
            apply_patch(kind, blob, a.buffers[model].chunks)
        for model, buf in a.buffers.items():  # rows of windows closed since their chunk was stored are done
            open_chunks = []
            for chunk in buf.chunks:
                keep = ~np.asarray(a._closed(chunk.starts), dtype=bool)
                if keep.any():
                    open_chunks.append(chunk if keep.all() else chunk.take(np.flatnonzero(keep)))
            buf.chunks = open_chunks
            for kind in EARLY:
                if self.saved_early.get((model, kind)) is None:
                    self.saved_early[(model, kind)] = None


_MESSAGES = {
    "late": "its window had closed (the watermark passed its end + grace)",
    "duplicate": "a record with this request_id was already seen in an open window",
    "unmatched": "no prediction for this request_id within the grace",
    "label_out_of_range": "the label is not one of the student's classes",
    "class_count_mismatch": "the replay has another class count than the student's prediction",
    "generative_mismatch": "a generative record meets a classifier's (a prediction in a window of the other kind, a "
                           "replay of the other kind, or a label for a generative prediction)",
    "generation_length_mismatch": "the replay scores another number of tokens than the student's generation",
}
