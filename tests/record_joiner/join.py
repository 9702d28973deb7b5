"""The record joiner: kdwatch's former per-record engine, kept as a second reference for the tests.

The request_id join and event-time windows of one co-partition, as pure logic.

``PartitionJoiner`` takes decoded events in arrival order and keeps:

- the join buffer: every prediction of an open window (for late partners and de-duplication), and
  teacher replays / labels that arrived before their prediction;
- the open windows' :class:`~analyzer.window.WindowState`;
- the watermark: how far event time has surely progressed on all three inputs. Each input's
  highest event time seen counts, except that an input with nothing left to read (caught up) does
  not hold the others back; so a predictions topic consumed far ahead of its replays cannot close
  windows whose replays are still unread (Flink's min-over-inputs watermark).

A window [start, start + size) closes, at the end of a batch, when the watermark reaches
``start + size + grace``: its state
is final and its buffer entries go. A replay or label joins its prediction whichever arrives first,
as long as both arrive before the prediction's window closes. A prediction for a closed window is
*late*: dead-lettered with reason ``late`` and counted in its stored window's ``n_late``. A replay or
label still unmatched when its own window closes is dead-lettered with reason ``unmatched``.
Nothing touches Kafka or a database here: each batch returns a :class:`Changes` for the caller to
make durable atomically (collector.consumer with storage.sql, or the offline path).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdwatch.analyzer.drift import Reference
from kdwatch.analyzer.window import WindowState
from kdwatch.collector.contract import Distribution, Generation, Label, Prediction, TeacherReplay
from kdwatch.collector.merge import watermark_candidate, window_start_of
from kdwatch.collector.records import (
    LABEL,
    NO_SEGMENT,
    PREDICTION,
    TEACHER,
    Changes,
    DeadLetter,
    Entry,
    Source,
    TransferRecord,
    WindowKey,
    transfer_rank,
)


@dataclass
class _Pending:
    """Contributions of one window gathered during a batch, applied vectorised at its end."""

    predictions: list[Prediction] = field(default_factory=list)
    pair_teacher: list[Distribution] = field(default_factory=list)
    teacher_versions: dict[str, int] = field(default_factory=dict)
    pair_student: list[Distribution] = field(default_factory=list)
    label_student: list[Distribution] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    lt_teacher: list[Distribution] = field(default_factory=list)
    lt_student: list[Distribution] = field(default_factory=list)
    lt_labels: list[int] = field(default_factory=list)
    audit_ids: list[str] = field(default_factory=list)
    audit_student: list[Distribution] = field(default_factory=list)
    audit_labels: list[int] = field(default_factory=list)
    audit_member: list[bool] = field(default_factory=list)
    gen_student: list[Generation] = field(default_factory=list)  # joined generative pairs
    gen_teacher: list[Generation] = field(default_factory=list)
    gen_audit_ids: list[str] = field(default_factory=list)
    gen_audit_student: list[Generation] = field(default_factory=list)
    gen_audit_member: list[bool] = field(default_factory=list)
    generative: bool | None = None  # what the window's predictions of this batch are
    rejected: int = 0
    duplicate: int = 0
    # segment -> [n, n_joined, n_agree, n_labeled, n_correct] (analyzer.window.SEGMENT_FIELDS)
    segments: dict[str, list[int]] = field(default_factory=dict)

    def segment(self, name: str | None) -> list[int]:
        return self.segments.setdefault(name or NO_SEGMENT, [0, 0, 0, 0, 0])


class PartitionJoiner:
    """Join, window and aggregate the events of one co-partition (see the module docstring)."""

    def __init__(
        self,
        window_ms: int,
        grace_ms: int,
        references: dict[str, Reference] | None = None,
        *,
        watermark: int | None = None,
        observed: dict[str, int] | None = None,
        windows: dict[WindowKey, WindowState] | None = None,
        entries: list[Entry] | None = None,
        max_future_ms: int | None = None,
        clock: Callable[[], float] = time.time,
        transfer_per_window: int = 0,
    ) -> None:
        if window_ms <= 0 or grace_ms < 0:
            raise ValueError("window must be > 0 and grace >= 0")
        # Live traffic only: an event time further ahead of the wall clock than this is a broken
        # clock, and would drag the watermark forward and make every later event late.
        self.max_future_ms = max_future_ms
        self.clock = clock
        # Joined predictions kept per closed window for the transfer set (0: none, features not buffered).
        self.transfer_per_window = transfer_per_window
        self.window_ms = window_ms
        self.grace_ms = grace_ms
        self.references = references or {}
        self.watermark = watermark
        self.observed: dict[str, int] = dict(observed or {})  # input kind -> highest event time processed
        self.windows: dict[WindowKey, WindowState] = dict(windows or {})
        self.entries: dict[tuple[str, str, str], Entry] = {}
        self._by_window: dict[int, set[tuple[str, str, str]]] = defaultdict(set)
        self._stale: dict[int, list[Entry]] = defaultdict(list)  # closed entries replaced by a newer one (see _put)
        for entry in entries or []:
            self._put(entry)
        self._changes = Changes()
        self._pending: dict[WindowKey, _Pending] = defaultdict(_Pending)

    # ---- buffer bookkeeping ----

    def _put(self, entry: Entry) -> None:
        key = (entry.kind, entry.model, entry.request_id)
        old = self.entries.get(key)
        if old is not None and old.window_start != entry.window_start:
            self._by_window[old.window_start].discard(key)
            if self._is_closed(old.window_start):
                # Its window closed with this record (it closes for good at the end of the batch): it is
                # still counted (unmatched, or sampled into the transfer set) when that happens.
                self._stale[old.window_start].append(old)
        self.entries[key] = entry
        self._by_window[entry.window_start].add(key)

    def _touch(self, entry: Entry) -> None:
        key = (entry.kind, entry.model, entry.request_id)
        self._changes.upserted[key] = entry
        self._changes.deleted.discard(key)

    def _drop(self, key: tuple[str, str, str]) -> None:
        entry = self.entries.pop(key)
        keys = self._by_window.get(entry.window_start)
        if keys is not None:
            keys.discard(key)
        self._changes.upserted.pop(key, None)
        self._changes.deleted.add(key)

    def _is_closed(self, window_start: int) -> bool:
        return self.watermark is not None and window_start + self.window_ms + self.grace_ms <= self.watermark

    def _live(self, kind: str, model: str, request_id: str) -> Entry | None:
        """The buffered entry, unless its window is already closed by the watermark.

        Windows close at the end of a batch, but an entry of a closed window must behave as gone at
        once, so the outcome never depends on where batch boundaries fall.
        """
        entry = self.entries.get((kind, model, request_id))
        if entry is None or self._is_closed(entry.window_start):
            return None
        return entry

    # ---- events ----

    def rejects_future(self, kind: str, ts_ms: int, source: Source | None) -> bool:
        """Reject (and count) an event time too far ahead of the wall clock; True when rejected."""
        if self.max_future_ms is None:
            return False
        limit = int(self.clock() * 1000) + self.max_future_ms
        if ts_ms <= limit:
            return False
        self.reject(kind, source, "future_timestamp", f"event time {ts_ms} is more than {self.max_future_ms} ms ahead of now")
        return True

    def add_prediction(self, event: Prediction, source: Source | None = None) -> None:
        # Every valid record moves its input's newest event time, late and duplicate ones too (as replays and labels do).
        self._observe("prediction", event.ts_ms)
        start = window_start_of(event.ts_ms, self.window_ms)
        wkey = WindowKey(event.model, event.student_version, start)
        if self._is_closed(start):
            self._changes.late[wkey] += 1
            if source is not None:
                self._changes.dead_letters.append(DeadLetter(source, "late", f"window {start} closed at watermark {self.watermark}"))
            self._changes.counters[("prediction", "late")] += 1
            return
        if self._live(PREDICTION, event.model, event.request_id) is not None:
            self._pending[wkey].duplicate += 1
            self._changes.counters[("prediction", "duplicate")] += 1
            self._dead_letter_duplicate(source, event.request_id)
            return
        if self._mixes_kinds(wkey, event.generation is not None, source):
            return
        pending = self._pending[wkey]
        entry = Entry(PREDICTION, event.model, event.request_id, start, event.student_version, event.dist,
                      event.label, has_label=event.label is not None, audit=event.audit is not None, segment=event.segment,
                      features=self._transfer_features(event), ts_ms=event.ts_ms, gen=event.generation)
        self._put(entry)
        self._touch(entry)
        if entry.audit and entry.gen is not None:
            pending.gen_audit_ids.append(event.request_id)
            pending.gen_audit_student.append(entry.gen)
            pending.gen_audit_member.append(event.audit == "member")
            return
        if entry.audit:
            assert event.label is not None and event.dist is not None  # the contract requires a label on audit records
            pending.audit_ids.append(event.request_id)
            pending.audit_student.append(event.dist)
            pending.audit_labels.append(event.label)
            pending.audit_member.append(event.audit == "member")
            return
        pending.predictions.append(event)
        counts = pending.segment(event.segment)
        counts[0] += 1
        if event.label is not None and event.dist is not None:
            pending.label_student.append(event.dist)
            pending.labels.append(event.label)
            counts[3] += 1
            counts[4] += int(int(event.dist.probs.argmax()) == event.label)
        early_teacher = self._live(TEACHER, event.model, event.request_id)
        if early_teacher is not None:
            self._drop((TEACHER, event.model, event.request_id))
            self._join_teacher(entry, early_teacher.dist, early_teacher.source, early_teacher.version, early_teacher.gen)
        early_label = self._live(LABEL, event.model, event.request_id)
        if early_label is not None:
            self._drop((LABEL, event.model, event.request_id))
            if entry.has_label:
                pending.duplicate += 1
                self._changes.counters[("label", "duplicate")] += 1
                self._dead_letter_duplicate(early_label.source, event.request_id)
            else:
                assert early_label.label is not None
                self._join_label(entry, early_label.label, early_label.source)

    def add_teacher(self, event: TeacherReplay, source: Source | None = None) -> None:
        self._observe("teacher", event.ts_ms)
        prediction = self._live(PREDICTION, event.model, event.request_id)
        if prediction is not None:
            if prediction.has_teacher or prediction.audit:
                self._count_duplicate(prediction, "teacher", source)
                return
            self._join_teacher(prediction, event.dist, source, event.teacher_version, event.generation)
            return
        self._buffer_early(TEACHER, event.model, event.request_id, event.ts_ms, source, dist=event.dist, version=event.teacher_version,
                           gen=event.generation)

    def add_label(self, event: Label, source: Source | None = None) -> None:
        self._observe("label", event.ts_ms)
        prediction = self._live(PREDICTION, event.model, event.request_id)
        if prediction is not None:
            if prediction.has_label or prediction.audit:
                self._count_duplicate(prediction, "label", source)
                return
            self._join_label(prediction, event.label, source)
            return
        self._buffer_early(LABEL, event.model, event.request_id, event.ts_ms, source, label=event.label)

    def count(self, kind: str, reason: str) -> None:
        """Count a record by kind and outcome (stored with the batch, so exactly once)."""
        self._changes.counters[(kind, reason)] += 1

    def reject(self, kind: str, source: Source | None, reason: str, message: str, window: WindowKey | None = None) -> None:
        """Count a record that failed validation (and dead-letter it when it came from Kafka)."""
        self._changes.counters[(kind, reason)] += 1
        if source is not None:
            self._changes.dead_letters.append(DeadLetter(source, reason, message))
        if window is not None and not self._is_closed(window.window_start):
            self._pending[window].rejected += 1

    # ---- joins ----

    def _count_duplicate(self, prediction: Entry, kind: str, source: Source | None) -> None:
        self._pending[WindowKey(prediction.model, prediction.version, prediction.window_start)].duplicate += 1
        self._changes.counters[(kind, "duplicate")] += 1
        self._dead_letter_duplicate(source, prediction.request_id)

    def _dead_letter_duplicate(self, source: Source | None, request_id: str) -> None:
        """A second record for a request_id already joined in an open window: kept out, and visible."""
        if source is not None:
            self._changes.dead_letters.append(DeadLetter(source, "duplicate", f"request_id {request_id[:80]!r} was already seen"))

    def _buffer_early(self, kind: str, model: str, request_id: str, ts_ms: int, source: Source | None,
                      dist: Distribution | None = None, label: int | None = None, version: str = "",
                      gen: Generation | None = None) -> None:
        topic = "teacher" if kind == TEACHER else "label"
        start = window_start_of(ts_ms, self.window_ms)
        if self._is_closed(start):
            self._changes.counters[(topic, "late")] += 1
            if source is not None:
                self._changes.dead_letters.append(DeadLetter(source, "late", f"window {start} closed at watermark {self.watermark}"))
            return
        if self._live(kind, model, request_id) is not None:
            self._changes.counters[(topic, "duplicate")] += 1
            self._dead_letter_duplicate(source, request_id)
            return
        entry = Entry(kind, model, request_id, start, version, dist, label, source=source, gen=gen)
        self._put(entry)
        self._touch(entry)

    def _transfer_features(self, event: Prediction) -> dict[str, Any] | None:
        """What the transfer set keeps of a prediction: its features, or a generative one's prompt (None: nothing)."""
        if not self.transfer_per_window or event.audit is not None:
            return None
        if event.generation is not None:
            return {"prompt_tokens": event.prompt_tokens} if event.prompt_tokens else None
        return event.features

    def _mixes_kinds(self, wkey: WindowKey, generative: bool, source: Source | None) -> bool:
        """Reject (True) a prediction whose kind (generative or classifier) differs from its window's so far."""
        pending = self._pending.get(wkey)
        known = pending.generative if pending is not None else None
        if known is None:
            state = self.windows.get(wkey)
            if state is not None and state.generative.active:
                known = True
            elif state is not None and (state.n or state.n_audit):
                known = False
        if known is None or known == generative:
            self._pending[wkey].generative = generative
            return False
        self.reject("prediction", source, "generative_mismatch", f"a {'generative' if generative else 'classifier'} prediction "
                    f"in a window of {'generative' if known else 'classifier'} predictions of model {wkey.model!r}", wkey)
        return True

    def _mismatch(self, prediction: Entry, dist: Distribution | None, label: int | None, source: Source | None, kind: str,
                  gen: Generation | None = None) -> bool:
        if (prediction.gen is not None) != (gen is not None) or (prediction.gen is not None and label is not None):
            what = "a label" if label is not None else ("a generative replay" if gen is not None else "a classifier replay")
            self.reject(kind, source, "generative_mismatch", f"{what} for a {'generative' if prediction.gen is not None else 'classifier'} "
                        f"prediction of model {prediction.model!r}")
            return True
        if prediction.gen is not None:
            assert gen is not None
            if gen.length != prediction.gen.length:
                self.reject(kind, source, "generation_length_mismatch",
                            f"the replay scores {gen.length} tokens, the prediction has {prediction.gen.length}")
                return True
            return False
        assert prediction.dist is not None
        k = prediction.dist.n_classes
        if dist is not None and dist.n_classes != k:
            self.reject(kind, source, "class_count_mismatch", f"{dist.n_classes} classes but the student has {k}")
            return True
        if label is not None and label >= k:
            self.reject(kind, source, "label_out_of_range", f"label {label} but the student has {k} classes")
            return True
        return False

    def _join_teacher(self, prediction: Entry, teacher: Distribution | None, source: Source | None,
                      teacher_version: str, gen: Generation | None = None) -> None:
        if self._mismatch(prediction, teacher, None, source, "teacher", gen):
            return
        pending = self._pending[WindowKey(prediction.model, prediction.version, prediction.window_start)]
        prediction.has_teacher = True
        prediction.teacher = teacher
        self._touch(prediction)
        pending.teacher_versions[teacher_version] = pending.teacher_versions.get(teacher_version, 0) + 1
        counts = pending.segment(prediction.segment)
        counts[1] += 1
        if prediction.gen is not None:
            assert gen is not None and gen.top1 is not None and prediction.gen.tokens is not None
            # A segment's agreement for a generative student is its sequence agreement (every token).
            counts[2] += int(np.array_equal(gen.top1, prediction.gen.tokens))
            pending.gen_student.append(prediction.gen)
            pending.gen_teacher.append(gen)
            prediction.teacher = gen  # for the transfer set
            return
        assert teacher is not None and prediction.dist is not None
        counts[2] += int(int(teacher.probs.argmax()) == int(prediction.dist.probs.argmax()))
        pending.pair_teacher.append(teacher)
        pending.pair_student.append(prediction.dist)
        if prediction.label is not None:
            pending.lt_teacher.append(teacher)
            pending.lt_student.append(prediction.dist)
            pending.lt_labels.append(prediction.label)

    def _join_label(self, prediction: Entry, label: int, source: Source | None) -> None:
        if self._mismatch(prediction, None, label, source, "label"):
            return
        assert prediction.dist is not None
        pending = self._pending[WindowKey(prediction.model, prediction.version, prediction.window_start)]
        prediction.has_label = True
        prediction.label = label
        self._touch(prediction)
        counts = pending.segment(prediction.segment)
        counts[3] += 1
        counts[4] += int(int(prediction.dist.probs.argmax()) == label)
        pending.label_student.append(prediction.dist)
        pending.labels.append(label)
        if isinstance(prediction.teacher, Distribution):
            pending.lt_teacher.append(prediction.teacher)
            pending.lt_student.append(prediction.dist)
            pending.lt_labels.append(label)

    # ---- windows ----

    def _observe(self, kind: str, ts_ms: int) -> None:
        if ts_ms > self.observed.get(kind, -1):
            self.observed[kind] = ts_ms
            self._changes.observed = self.observed

    def advance_watermark(self, caught_up: dict[str, bool]) -> None:
        """Move the watermark now, without closing windows (end_batch closes them).

        Entries of windows it closes behave as gone at once (see ``_live``), so calling this after
        every record makes the outcome independent of where end_batch falls: the offline path does.
        """
        self._advance_watermark(caught_up)

    def _advance_watermark(self, caught_up: dict[str, bool]) -> None:
        """Move the watermark to the least event time of the inputs that still have records to read."""
        candidate = watermark_candidate(self.observed, caught_up)
        if candidate is None:
            return
        if self.watermark is None or candidate > self.watermark:
            self.watermark = candidate
            self._changes.watermark = candidate

    def _apply_pending(self) -> None:
        for wkey, p in self._pending.items():
            state = self.windows.get(wkey)
            if state is None:
                state = self.windows[wkey] = WindowState()
            state.add_predictions(p.predictions, self.references.get(wkey.model))
            state.add_pairs(p.pair_teacher, p.pair_student)
            for version, count in p.teacher_versions.items():
                state.teacher_versions[version] = state.teacher_versions.get(version, 0) + count
            state.add_segments(p.segments)
            state.add_labels(p.label_student, p.labels)
            state.add_labels_with_teacher(p.lt_teacher, p.lt_student, p.lt_labels)
            state.add_audit(p.audit_ids, p.audit_student, p.audit_labels, p.audit_member)
            state.add_generations(p.gen_student, p.gen_teacher)
            state.add_generative_audit(p.gen_audit_ids, p.gen_audit_student, p.gen_audit_member)
            state.n_rejected += p.rejected
            state.n_duplicate += p.duplicate
            self._changes.windows[wkey] = state
        self._pending.clear()

    def _close_windows(self, everything: bool) -> None:
        for wkey in sorted(self.windows):
            if everything or self._is_closed(wkey.window_start):
                state = self.windows.pop(wkey)
                self._changes.windows.pop(wkey, None)
                self._changes.closed[wkey] = state
        for start in sorted(self._by_window):
            if not (everything or self._is_closed(start)):
                continue
            closing: list[Entry] = []
            for key in sorted(self._by_window.pop(start)):
                entry = self.entries.get(key)
                if entry is None or entry.window_start != start:
                    continue
                closing.append(entry)
                self.entries.pop(key)
                self._changes.upserted.pop(key, None)
                self._changes.deleted.discard(key)
            closing.extend(self._stale.pop(start, ()))
            self._retire(closing)
            self._changes.closed_starts.add(start)
        for start in [s for s in self._stale if everything or self._is_closed(s)]:
            self._retire(self._stale.pop(start))

    def _retire(self, closing: list[Entry]) -> None:
        """Entries of a window that closed: unmatched replays and labels are counted, joined predictions sampled."""
        candidates: list[Entry] = []
        for entry in closing:
            if entry.kind == PREDICTION and entry.has_teacher and entry.features is not None:
                candidates.append(entry)
            if entry.kind != PREDICTION:
                topic = "teacher" if entry.kind == TEACHER else "label"
                self._changes.counters[(topic, "unmatched")] += 1
                if entry.source is not None:
                    self._changes.dead_letters.append(
                        DeadLetter(entry.source, "unmatched", f"no prediction for request_id {entry.request_id!r} within the grace"))
        self._sample_transfer(candidates)

    def _sample_transfer(self, candidates: list[Entry]) -> None:
        """Keep the ``transfer_per_window`` lowest-ranked joined predictions of each (model, version) window."""
        if not candidates:
            return
        by_window: dict[tuple[str, str], list[Entry]] = defaultdict(list)
        for entry in candidates:
            by_window[(entry.model, entry.version)].append(entry)
        for entries in by_window.values():
            entries.sort(key=lambda e: transfer_rank(e.model, e.request_id))
            for e in entries[: self.transfer_per_window]:
                student = e.gen if e.gen is not None else e.dist
                assert student is not None and e.teacher is not None and e.features is not None
                self._changes.transfer.append(TransferRecord(e.model, e.request_id, e.ts_ms, e.version, e.features,
                                                             e.teacher, student, e.label if e.has_label else None))

    def end_batch(self, caught_up: dict[str, bool] | None = None, close_all: bool = False) -> Changes:
        """Apply the batch's contributions, advance the watermark, close due windows, hand over changes.

        ``caught_up`` tells, per input kind, whether it has nothing left to read right now;
        ``close_all`` closes every window (the offline path at the end of its input).
        """
        self._apply_pending()
        self._advance_watermark(caught_up or {})
        self._close_windows(close_all)
        changes, self._changes = self._changes, Changes()
        if changes.observed is not None:
            changes.observed = dict(changes.observed)  # a copy: the joiner goes on moving its own
        return changes
