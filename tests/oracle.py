"""An independent model of kdwatch's join and window semantics, written from the README alone.

It shares no code with the engine (no kdwatch import): plain Python over already valid events, so a
mistake common to the Kafka path and `kdwatch analyze` (which run the same joiner) shows up as a
difference here. It covers which records join, which are late, duplicate or unmatched, and the
counting fields of each window; the metric maths are checked against scipy and scikit-learn
elsewhere (tests/unit/analyzer/test_reference_metrics.py).

The README's rules, as modelled:
- Records are processed in one merge of the three inputs: repeatedly the head with the lowest event
  time (ties: predictions, replays, labels); an input at its end no longer holds the watermark back.
- The watermark is the least, over inputs not at their end, of the newest event time processed on
  each (all inputs at their end: the newest overall); a window [s, s + size) closes when it reaches
  s + size + grace.
- A prediction whose window is closed is late (``n_late`` of its window). A second prediction for
  a (model, request_id) whose first is in an open window is a duplicate (``n_duplicate`` of the
  second's window). A replay or label joins its prediction whichever comes first, while the
  prediction's window is open; a second one for a joined prediction is a duplicate. One that comes
  first waits while its own window is open; late if its own window is already closed; unmatched if
  its window closes with it still waiting.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

INPUTS = ("prediction", "teacher", "label")


@dataclass
class OracleWindow:
    n: int = 0
    n_joined: int = 0
    n_agree: int = 0
    n_labeled: int = 0
    n_correct: int = 0
    n_late: int = 0
    n_duplicate: int = 0
    n_audit: int = 0

    def fields(self) -> dict[str, Any]:
        return {"n": self.n, "n_joined": self.n_joined, "n_labeled": self.n_labeled, "n_late": self.n_late,
                "n_duplicate": self.n_duplicate, "n_audit": self.n_audit,
                "agreement": self.n_agree / self.n_joined if self.n_joined else None,
                "accuracy_student": self.n_correct / self.n_labeled if self.n_labeled else None}


@dataclass
class _Prediction:
    version: str
    start: int
    argmax: int
    classes: int
    audit: bool
    label: int | None
    teacher_argmax: int | None = None


@dataclass
class _Early:
    start: int
    value: Any  # the replay's argmax and class count, or the label


@dataclass
class Oracle:
    window_ms: int
    grace_ms: int
    windows: dict[tuple[str, str, int], OracleWindow] = field(default_factory=lambda: defaultdict(OracleWindow))
    counters: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def run(self, inputs: dict[str, list[dict[str, Any]]]) -> None:
        """``inputs``: kind -> its valid events (JSON objects with integer ``ts``), in the input's own order."""
        streams = [[(e["ts"], order, i, kind, e) for i, e in enumerate(inputs.get(kind, []))]
                   for order, kind in enumerate(INPUTS)]
        remaining = {kind: len(inputs.get(kind, [])) for kind in INPUTS}
        newest: dict[str, int] = {}
        self.watermark: int | None = None
        self.predictions: dict[tuple[str, str], _Prediction] = {}
        self.early: dict[tuple[str, str, str], _Early] = {}
        # heapq.merge takes the lowest head each time; ties go to the earlier iterable (predictions first).
        for ts, _order, _i, kind, event in heapq.merge(*streams, key=lambda r: (r[0], r[1])):
            getattr(self, f"_{kind}")(event)
            newest[kind] = max(newest.get(kind, ts), ts)
            remaining[kind] -= 1
            self._advance(newest, remaining)
        self._close(everything=True)

    # ---- the watermark ----

    def _closed(self, start: int) -> bool:
        return self.watermark is not None and start + self.window_ms + self.grace_ms <= self.watermark

    def _advance(self, newest: dict[str, int], remaining: dict[str, int]) -> None:
        if not newest:
            return
        reading = [kind for kind in INPUTS if remaining[kind] > 0]
        if any(kind not in newest for kind in reading):
            return  # an input still read has shown nothing yet: it may hold anything
        candidate = min(newest[k] for k in reading) if reading else max(newest.values())
        if self.watermark is None or candidate > self.watermark:
            self.watermark = candidate

    def _close(self, everything: bool = False) -> None:
        for key, early in list(self.early.items()):
            if everything or self._closed(early.start):
                self.counters[(key[0], "unmatched")] += 1
                del self.early[key]
        for key, prediction in list(self.predictions.items()):
            if everything or self._closed(prediction.start):
                del self.predictions[key]

    def _start(self, ts: int) -> int:
        return ts - ts % self.window_ms

    # ---- events ----

    def _prediction(self, e: dict[str, Any]) -> None:
        self._close()
        start = self._start(e["ts"])
        window = self.windows[(e["model"], e["student_version"], start)]
        self.counters[("prediction", "valid")] += 1
        if self._closed(start):
            window.n_late += 1
            self.counters[("prediction", "late")] += 1
            return
        key = (e["model"], e["request_id"])
        if key in self.predictions:
            window.n_duplicate += 1
            self.counters[("prediction", "duplicate")] += 1
            return
        probs = e["probs"]
        argmax = max(range(len(probs)), key=lambda i: (probs[i], -i))
        p = _Prediction(e["student_version"], start, argmax, len(probs), "audit" in e, e.get("label"))
        self.predictions[key] = p
        if p.audit:
            window.n_audit += 1
            return
        window.n += 1
        if p.label is not None:
            window.n_labeled += 1
            window.n_correct += int(argmax == p.label)
        teacher = self.early.pop(("teacher", *key), None)
        if teacher is not None:
            self._join_teacher(e["model"], p, teacher.value)
        label = self.early.pop(("label", *key), None)
        if label is not None:
            if p.label is not None:
                window.n_duplicate += 1
                self.counters[("label", "duplicate")] += 1
            else:
                self._join_label(e["model"], p, label.value)

    def _partner(self, kind: str, e: dict[str, Any], value: Any) -> None:
        self._close()
        self.counters[(kind, "valid")] += 1
        key = (e["model"], e["request_id"])
        p = self.predictions.get(key)
        if p is not None:
            joined = p.teacher_argmax is not None if kind == "teacher" else p.label is not None
            if joined or p.audit:
                self.windows[(e["model"], p.version, p.start)].n_duplicate += 1
                self.counters[(kind, "duplicate")] += 1
            elif kind == "teacher":
                self._join_teacher(e["model"], p, value)
            else:
                self._join_label(e["model"], p, value)
            return
        start = self._start(e["ts"])
        if self._closed(start):
            self.counters[(kind, "late")] += 1
        elif (kind, *key) in self.early:
            self.counters[(kind, "duplicate")] += 1
        else:
            self.early[(kind, *key)] = _Early(start, value)

    def _teacher(self, e: dict[str, Any]) -> None:
        probs = e["probs"]
        self._partner("teacher", e, (max(range(len(probs)), key=lambda i: (probs[i], -i)), len(probs)))

    def _label(self, e: dict[str, Any]) -> None:
        self._partner("label", e, e["label"])

    def _join_teacher(self, model: str, p: _Prediction, value: tuple[int, int]) -> None:
        argmax, classes = value
        if classes != p.classes:  # README, dead-letter reasons: not the student's class count; it joins nothing
            self.counters[("teacher", "class_count_mismatch")] += 1
            return
        p.teacher_argmax = argmax
        window = self.windows[(model, p.version, p.start)]
        window.n_joined += 1
        window.n_agree += int(argmax == p.argmax)

    def _join_label(self, model: str, p: _Prediction, label: int) -> None:
        if label >= p.classes:  # README, dead-letter reasons: not one of the student's classes; it joins nothing
            self.counters[("label", "label_out_of_range")] += 1
            return
        p.label = label
        window = self.windows[(model, p.version, p.start)]
        window.n_labeled += 1
        window.n_correct += int(p.argmax == label)
