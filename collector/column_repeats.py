"""Repeated request_ids in the columnar engine: the rows the README's rules count as duplicates.

At-least-once producers send some records twice. The rules decide record by record (as the tests'
record joiner, tests/record_joiner, applies them): a second prediction while the first's window is open, a second replay or label for a
prediction that has one (or is an audit record), a label for a prediction that carried its own,
and a second early replay or label while the first waits, are duplicates: counted, dead-lettered,
and otherwise without effect. Those decisions depend only on the rows of the same ``request_id``,
their order in the merge and the watermark each arrived at, so they are taken here for the few
request_ids involved, one row at a time, before the vectorised join; what is left has at most one
row per request_id and kind, which is what the vectorised join models.

A replay or label waiting for its prediction whose window closed is unmatched; one for the same
request_id arriving after that waits in its place (counting the first when its window closes
gives the same totals). A prediction's request_id used again after the first one's window
closed (a new request under an old id, not a retry) is a new prediction: the engine takes the
stretch in two at it (``Repeats.reused``), closing the first one's window in between, as a
record-by-record join has closed it by then.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from kdwatch.collector.column_join import JoinBuffer
from kdwatch.collector.column_rules import row_classes, row_lengths
from kdwatch.collector.columns import Block, InvariantError, present
from kdwatch.collector.records import WindowKey

PARTNERS = ("teacher", "label")


@dataclass
class Repeats:
    """What the duplicate rules decide for one model's stretch."""

    drop: dict[str, list[int]] = field(default_factory=lambda: {"prediction": [], "teacher": [], "label": []})
    drop_early: dict[str, list[int]] = field(default_factory=lambda: {"teacher": [], "label": []})
    windows: Counter[WindowKey] = field(default_factory=Counter)  # n_duplicate per window
    rejected: Counter[WindowKey] = field(default_factory=Counter)  # n_rejected per window (generative_mismatch)
    counters: Counter[tuple[str, str]] = field(default_factory=Counter)
    letters: list[tuple[str, str, int, str]] = field(default_factory=list)  # (kind, "step" or "buffer", row, reason) dropped
    # (merge position, watermark at it) of a prediction whose request_id comes again after the first one's window
    # closed: a new request under an old id. The stretch is taken in two (before it; the closed windows closed;
    # from it on) and nothing else is decided here.
    reused: tuple[int, int] | None = None

    def dropped(self, kind: str, where: str, row: int, reason: str) -> None:
        (self.drop_early[kind] if where == "buffer" else self.drop[kind]).append(row)
        self.counters[(kind, reason)] += 1
        self.letters.append((kind, where, row, reason))


@dataclass
class _Prediction:
    start: int
    version: str
    audit: bool
    own_label: bool
    has: dict[str, bool]
    classes: int
    length: int  # a generative prediction's number of tokens (0: a classifier's)


@dataclass
class _Early:
    start: int
    where: tuple[str, int]  # ("buffer", row of the early block) or ("step", row of the stretch's block)


def _repeated(keys: np.ndarray) -> np.ndarray:
    """Mask of the keys that occur more than once."""
    out = np.zeros(keys.size, dtype=bool)
    if keys.size < 2:
        return out
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    same = ordered[1:] == ordered[:-1]
    mask = np.zeros(keys.size, dtype=bool)
    mask[1:] |= same
    mask[:-1] |= same
    out[order] = mask
    return out


def _rows_with(block: Block, keys: np.ndarray) -> np.ndarray:
    """Rows of ``block`` whose join key is one of ``keys`` (a hash table of the few keys, not a sort of the block)."""
    return np.flatnonzero(pd.Index(keys).get_indexer(block.key) >= 0)


def _in_buffer(buf: JoinBuffer, values: Block) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per row of ``values``: found among the buffered predictions, and whether that one takes no more replays / labels.

    Looked up in each chunk's hash index (built once per chunk, kept for the join's own lookups).
    """
    found = np.zeros(values.n, dtype=bool)
    taken = {"teacher": np.zeros(values.n, dtype=bool), "label": np.zeros(values.n, dtype=bool)}
    for chunk in buf.chunks:
        at = chunk.find(values)
        hit = at >= 0
        if not hit.any():
            continue
        rows, p = at[hit], chunk.preds
        assert p.audit is not None and p.label is not None
        audit = p.audit[rows] > 0
        found |= hit
        taken["teacher"][hit] |= audit | chunk.has_teacher[rows]
        taken["label"][hit] |= audit | (p.label[rows] >= 0) | (chunk.label_joined[rows] >= 0)
    return found, taken


def _early_keys(block: Block | None) -> np.ndarray:
    return np.zeros(0, dtype=np.uint64) if block is None or not block.n else block.key


def conflict_keys(buf: JoinBuffer, blocks: dict[str, Block]) -> np.ndarray:
    """Keys of the request_ids whose rows may hold a duplicate (a superset: hashes, not strings)."""
    keys = {kind: b.key for kind, b in blocks.items()}
    empty = np.zeros(0, dtype=np.uint64)
    early = {"teacher": _early_keys(buf.early_teacher), "label": _early_keys(buf.early_label)}
    found: list[np.ndarray] = []
    preds = blocks.get("prediction")
    if preds is not None:
        assert preds.audit is not None and preds.label is not None
        p = keys["prediction"]
        audit, labelled = preds.audit > 0, preds.label >= 0
        candidate = _repeated(p) | _in_buffer(buf, preds)[0]
        for kind, closed in (("teacher", audit), ("label", audit | labelled)):
            if closed.any():
                candidate[closed] |= np.isin(p[closed], np.concatenate([early[kind], keys.get(kind, empty)]))
        found.append(p[candidate])
    for kind in PARTNERS:
        if kind not in keys:
            continue
        k = keys[kind]
        candidate = _repeated(k) | _in_buffer(buf, blocks[kind])[1][kind]
        if early[kind].size:
            candidate |= np.isin(k, early[kind])
        if preds is not None:
            assert preds.audit is not None and preds.label is not None
            closed = (preds.audit > 0) if kind == "teacher" else (preds.audit > 0) | (preds.label >= 0)
            if closed.any():
                candidate |= np.isin(k, keys["prediction"][closed])
        found.append(k[candidate])
    return np.unique(np.concatenate(found)) if found else empty


def _buffered_state(model: str, buf: JoinBuffer, conflict: np.ndarray, start_of: Callable[[int], int]
                    ) -> tuple[dict[str, _Prediction], dict[tuple[str, str], _Early]]:
    """The buffered rows of the conflicting request_ids: their open predictions and early partners."""
    preds: dict[str, _Prediction] = {}
    early: dict[tuple[str, str], _Early] = {}
    for chunk in buf.chunks:
        rows = chunk.rows_with(conflict)
        p = chunk.preds
        assert p.audit is not None and p.label is not None
        classes, lengths = row_classes(p, rows).tolist(), row_lengths(p, rows).tolist()
        for rid, ver, r, k, n in zip(p.request_id.take(rows).to_pylist(), p.version.take(rows).to_pylist(), rows.tolist(),
                                     classes, lengths, strict=True):
            if rid in preds:
                raise InvariantError(f"prediction request_id {rid[:80]!r} of model {model!r} is buffered twice")
            preds[rid] = _Prediction(int(chunk.starts[r]), ver, bool(p.audit[r] > 0), bool(p.label[r] >= 0),
                                     {"teacher": bool(chunk.has_teacher[r]),
                                      "label": bool(p.label[r] >= 0 or chunk.label_joined[r] >= 0)}, k, n)
    for kind in PARTNERS:
        block = buf.early_teacher if kind == "teacher" else buf.early_label
        if block is None or not block.n:
            continue
        rows = _rows_with(block, conflict)
        for rid, r in zip(block.request_id.take(rows).to_pylist(), rows.tolist(), strict=True):
            if (kind, rid) in early:
                raise InvariantError(f"{kind} request_id {rid[:80]!r} of model {model!r} is buffered twice")
            early[(kind, rid)] = _Early(start_of(int(block.ts[r])), ("buffer", r))

    return preds, early


def _generative_rows(block: Block) -> np.ndarray:
    return present(block.gen, block.n)


def mixed_windows(buf: JoinBuffer, preds: Block | None, window_ms: int
                  ) -> tuple[np.ndarray, set[tuple[str, int]], dict[tuple[str, int], bool]]:
    """Keys of the predictions of windows where generative and classifier predictions meet, those windows
    ((version, start)), and the kinds known for them from the buffer.

    A window's kind is its first accepted prediction's (README, generative students): a prediction of the
    other kind is rejected as ``generative_mismatch``. Windows whose predictions so far (buffered) and in
    this stretch are all of one kind need no decision; the others are decided row by row. Usually none:
    without a generative row on either side nothing is computed.
    """
    none: tuple[np.ndarray, set[tuple[str, int]], dict[tuple[str, int], bool]] = (np.zeros(0, dtype=np.uint64), set(), {})
    if preds is None or not preds.n or (preds.gen is None and all(c.preds.gen is None for c in buf.chunks)):
        return none  # a classifier's stretch and buffer (the usual case): nothing computed per buffered row
    gen = _generative_rows(preds)
    buffered = [(chunk, _generative_rows(chunk.preds)) for chunk in buf.chunks]
    if not gen.any() and not any(g.any() for _c, g in buffered):
        return none
    if gen.all() and all(g.all() for _c, g in buffered):
        return none
    known: dict[tuple[str, int], bool] = {}
    for chunk, g in buffered:
        known.update(zip(zip(chunk.preds.version.to_pylist(), chunk.starts.tolist(), strict=True), g.tolist(), strict=True))
    seen: dict[tuple[str, int], set[bool]] = {}
    wins = list(zip(preds.version.to_pylist(), (preds.ts - preds.ts % window_ms).tolist(), strict=True))
    for win, g in zip(wins, gen.tolist(), strict=True):
        seen.setdefault(win, set()).add(g)
    mixed = {win for win, kinds in seen.items() if len(kinds) > 1 or (win in known and known[win] not in kinds)}
    if not mixed:
        return none
    rows = np.fromiter((win in mixed for win in wins), dtype=bool, count=len(wins))
    return preds.key[rows], mixed, {win: known[win] for win in mixed if win in known}


def _fits(block: Block | None, kind: str, row: int, pred: _Prediction) -> bool:
    """Whether a replay or label row may join ``pred`` (its kind and class count or length; a label among its classes)."""
    assert block is not None
    if kind == "teacher":
        at = np.array([row])
        return int(row_classes(block, at)[0]) == pred.classes and int(row_lengths(block, at)[0]) == pred.length
    assert block.label is not None
    return int(block.label[row]) < pred.classes


def _events(blocks: dict[str, Block], conflict: np.ndarray, window_ms: int) -> list[tuple[int, str, int, str, int, int]]:
    """The stretch's rows of the ``conflict`` keys, in merge order: (position, kind, row, request_id, window start,
    arrival watermark)."""
    events: list[tuple[int, str, int, str, int, int]] = []
    for kind, block in blocks.items():
        rows = _rows_with(block, conflict)
        if not rows.size:
            continue
        assert block.position is not None and block.arrival_wm is not None
        ids = block.request_id.take(rows).to_pylist()
        starts = (block.ts[rows] - block.ts[rows] % window_ms).tolist()
        for rid, r, start in zip(ids, rows.tolist(), starts, strict=True):
            events.append((int(block.position[r]), kind, r, rid, start, int(block.arrival_wm[r])))
    events.sort()
    return events


def find_repeats(model: str, buf: JoinBuffer, blocks: dict[str, Block], window_ms: int, grace_ms: int) -> Repeats | None:
    """The duplicates of one model's stretch (rows already stepped: positions and arrival watermarks set).

    Predictions in ``blocks`` are the ones not late. None when no request_id can hold a duplicate,
    the usual case, decided on hashes without a Python loop. A replay of another class count than its
    prediction, or a label outside its classes, is rejected when it would join (by the join): the
    prediction takes another one. In a window where generative and classifier predictions meet
    (:func:`mixed_windows`), a prediction of the other kind than the window's first is rejected here.
    """
    mixed, decide, kinds = mixed_windows(buf, blocks.get("prediction"), window_ms)
    conflict = np.union1d(conflict_keys(buf, blocks), mixed) if mixed.size else conflict_keys(buf, blocks)
    if not conflict.size:
        return None
    span = window_ms + grace_ms
    gen = _generative_rows(blocks["prediction"]) if decide else None

    def start_of(ts: int) -> int:
        return ts - ts % window_ms

    preds, early = _buffered_state(model, buf, conflict, start_of)

    def fits(kind: str, where: tuple[str, int], pred: _Prediction) -> bool:
        return _fits(blocks[kind] if where[0] == "step" else getattr(buf, f"early_{kind}"), kind, where[1], pred)

    out = Repeats()
    for position, kind, row, rid, start, wm in _events(blocks, conflict, window_ms):
        pred = preds.get(rid)
        live = pred is not None and pred.start + span > wm
        if kind == "prediction":
            block = blocks["prediction"]
            assert block.audit is not None and block.label is not None
            version = str(block.version[row].as_py())
            if pred is not None and live:
                out.dropped(kind, "step", row, "duplicate")
                out.windows[WindowKey(model, version, start)] += 1
                continue
            if pred is not None:
                return Repeats(reused=(position, wm))
            if (version, start) in decide:  # a window where both kinds meet: the first accepted one sets its kind
                assert gen is not None
                generative = bool(gen[row])
                if kinds.setdefault((version, start), generative) != generative:
                    out.dropped(kind, "step", row, "generative_mismatch")
                    out.rejected[WindowKey(model, version, start)] += 1
                    continue
            audit, own_label = bool(block.audit[row] > 0), bool(block.label[row] >= 0)
            at = np.array([row])
            pred = preds[rid] = _Prediction(start, version, audit, own_label, {"teacher": False, "label": own_label},
                                            int(row_classes(block, at)[0]), int(row_lengths(block, at)[0]))
            if audit:  # an audit record joins nothing; early partners wait for their window to close
                continue
            for partner in PARTNERS:
                waiting = early.get((partner, rid))
                if waiting is None or waiting.start + span <= wm:
                    continue
                del early[(partner, rid)]
                if partner == "label" and own_label:  # the label came twice: with the prediction and on its own
                    out.dropped(partner, *waiting.where, "duplicate")
                    out.windows[WindowKey(model, version, start)] += 1
                elif fits(partner, waiting.where, pred):
                    pred.has[partner] = True
            continue
        if pred is not None and live:
            if pred.has[kind] or pred.audit:
                out.dropped(kind, "step", row, "duplicate")
                out.windows[WindowKey(model, pred.version, pred.start)] += 1
            elif fits(kind, ("step", row), pred):
                pred.has[kind] = True
            continue
        if start + span <= wm:  # late: its own window closed and no open prediction (counted by the join)
            continue
        waiting = early.get((kind, rid))
        if waiting is not None and waiting.start + span > wm:
            out.dropped(kind, "step", row, "duplicate")
        else:
            if waiting is not None:  # the one waiting saw its window close: unmatched now, this one waits instead
                out.dropped(kind, *waiting.where, "unmatched")
            early[(kind, rid)] = _Early(start, ("step", row))
    return out


def without(block: Block | None, rows: list[int]) -> Block | None:
    """The block less ``rows``."""
    if block is None or not rows:
        return block
    keep = np.ones(block.n, dtype=bool)
    keep[rows] = False
    return block.take(np.flatnonzero(keep))

