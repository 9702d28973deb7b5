"""The mergeable state of one (model, student_version, window) and the fields it reports.

``WindowState`` composes the metric states; every part merges by addition (or by set union for
membership scores), so partitions, replicas and roll-ups combine exactly:
``a.merge(b)`` gives the same result as one state that saw both event sets, in any order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdwatch.analyzer.calibration import CalibrationState
from kdwatch.analyzer.drift import DriftState, Reference, output_features
from kdwatch.analyzer.fidelity import FidelityState, student_log_probs, teacher_log_probs
from kdwatch.analyzer.generative import GenerativeState
from kdwatch.analyzer.membership import MembershipState, attack_scores
from kdwatch.analyzer.sketch import QuantileSketch
from kdwatch.timestamps import rfc3339


def _group_by_classes(indices_dists: Sequence[tuple[int, Any]]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for i, dist in indices_dists:
        groups[dist.probs.shape[0]].append(i)
    return groups


# The updates take "distributions": objects with ``probs`` (K,) and ``log_probs`` (K,) or None,
# such as collector.contract.Distribution.


def _stack(dists: Sequence[Any], student: bool) -> tuple[np.ndarray, np.ndarray]:
    probs = np.stack([d.probs for d in dists])
    logs = np.stack([
        (student_log_probs if student else teacher_log_probs)(d.probs, d.log_probs) for d in dists
    ])
    return probs, logs


SEGMENT_FIELDS = ("n", "n_joined", "n_agree", "n_labeled", "n_correct")
MAX_SEGMENTS = 1000
OTHER_SEGMENT = "_other"


@dataclass
class WindowState:
    n: int = 0
    n_rejected: int = 0
    n_late: int = 0
    n_duplicate: int = 0
    n_audit: int = 0
    fidelity: FidelityState = field(default_factory=FidelityState)
    calibration: CalibrationState = field(default_factory=CalibrationState)
    # Over events having both a label and a teacher replay.
    n_labeled_with_teacher: int = 0
    n_correct_student_lt: int = 0
    teacher_calibration: CalibrationState = field(default_factory=CalibrationState)
    drift: DriftState = field(default_factory=DriftState)
    membership: MembershipState = field(default_factory=MembershipState)
    latency: QuantileSketch = field(default_factory=QuantileSketch)
    # Joined replays per teacher version (the retrain request names the teacher).
    teacher_versions: dict[str, int] = field(default_factory=dict)
    # segment -> SEGMENT_FIELDS counts. Exact up to MAX_SEGMENTS names per window; counts of further
    # names are kept under OTHER_SEGMENT (segments are meant to be few: regions, tenants, tiers).
    segments: dict[str, list[int]] = field(default_factory=dict)
    generative: GenerativeState = field(default_factory=GenerativeState)  # a language-model student's

    def add_segments(self, counts: dict[str, list[int]]) -> None:
        for name, values in counts.items():
            if name not in self.segments and len(self.segments) >= MAX_SEGMENTS:
                name = OTHER_SEGMENT
            mine = self.segments.setdefault(name, [0] * len(SEGMENT_FIELDS))
            for i, v in enumerate(values):
                mine[i] += v

    # ---- updates (each takes a batch of events of this window) ----

    def add_predictions(self, predictions: Sequence[Any], reference: Reference | None) -> None:
        """Student-only contributions of production predictions (not audit records)."""
        if not predictions:
            return
        self.n += len(predictions)
        latencies = [p.latency_ms for p in predictions if p.latency_ms is not None]
        if latencies:
            self.latency.update(np.asarray(latencies))
        if reference is not None:
            columns: dict[str, list[Any]] = {name: [] for name in reference.features}
            for p in predictions:
                outputs = output_features(p.dist, p.generation)
                feats = p.features or {}
                for name, col in columns.items():
                    col.append(outputs.get(name) if name.startswith("_") else feats.get(name))
            self.drift.update(reference, columns)
        lengths = [p.generation.logprobs.shape[0] for p in predictions if p.generation is not None]
        if lengths:
            self.generative.add_lengths(lengths)

    def add_pairs(self, teacher: Sequence[Any], student: Sequence[Any]) -> None:
        """Fidelity of joined (teacher replay, student prediction) distribution pairs."""
        for idx in _group_by_classes(list(enumerate(teacher))).values():
            t, log_t = _stack([teacher[i] for i in idx], student=False)
            s, log_s = _stack([student[i] for i in idx], student=True)
            self.fidelity.update(t, log_t, s, log_s)

    def add_labels(self, student: Sequence[Any], labels: Sequence[int]) -> None:
        """Student calibration and accuracy over labelled predictions."""
        if not student:
            return
        confidence = np.array([d.probs.max() for d in student])
        correct = np.array([int(np.argmax(d.probs)) == y for d, y in zip(student, labels, strict=True)])
        self.calibration.update(confidence, correct)

    def add_labels_with_teacher(self, teacher: Sequence[Any], student: Sequence[Any], labels: Sequence[int]) -> None:
        """Teacher calibration and both accuracies over events having a label and a replay."""
        if not teacher:
            return
        y = np.asarray(labels)
        t_pred = np.array([int(np.argmax(d.probs)) for d in teacher])
        s_pred = np.array([int(np.argmax(d.probs)) for d in student])
        self.n_labeled_with_teacher += len(teacher)
        self.n_correct_student_lt += int((s_pred == y).sum())
        self.teacher_calibration.update(np.array([d.probs.max() for d in teacher]), t_pred == y)

    def add_generations(self, student: Sequence[Any], teacher: Sequence[Any]) -> None:
        """Token-level fidelity of joined (student, teacher) generations (analyzer.generative)."""
        self.generative.add_pairs(student, teacher)

    def add_generative_audit(self, request_ids: Sequence[str], student: Sequence[Any], member: Sequence[bool]) -> None:
        """Membership inference on generative audit records: the loss attack on the sequence's mean log-probability
        (a member's text is likelier: higher = member, as the classifier's ln p[label]); the other attacks are null."""
        if not student:
            return
        self.n_audit += len(student)
        self.generative.n_audit += len(student)
        loss = np.array([float(g.logprobs.mean()) for g in student])
        nan = np.full(len(student), np.nan)
        self.membership.update(list(request_ids), np.asarray(member), {"loss": loss, "confidence": nan, "mentropy": nan})

    def add_audit(self, request_ids: Sequence[str], student: Sequence[Any], labels: Sequence[int], member: Sequence[bool]) -> None:
        """Membership-inference scores of audit replays."""
        if not student:
            return
        self.n_audit += len(student)
        for idx in _group_by_classes(list(enumerate(student))).values():
            probs, logs = _stack([student[i] for i in idx], student=True)
            scores = attack_scores(probs, logs, np.asarray([labels[i] for i in idx]))
            self.membership.update([request_ids[i] for i in idx], np.asarray([member[i] for i in idx]), scores)

    # ---- merge and result ----

    def merge(self, other: WindowState) -> WindowState:
        self.n += other.n
        self.n_rejected += other.n_rejected
        self.n_late += other.n_late
        self.n_duplicate += other.n_duplicate
        self.n_audit += other.n_audit
        self.fidelity.merge(other.fidelity)
        self.calibration.merge(other.calibration)
        self.n_labeled_with_teacher += other.n_labeled_with_teacher
        self.n_correct_student_lt += other.n_correct_student_lt
        self.teacher_calibration.merge(other.teacher_calibration)
        self.drift.merge(other.drift)
        self.membership.merge(other.membership)
        self.latency.merge(other.latency)
        for version, count in other.teacher_versions.items():
            self.teacher_versions[version] = self.teacher_versions.get(version, 0) + count
        self.add_segments(other.segments)
        self.generative.merge(other.generative)
        return self

    def result(self, reference: Reference | None = None) -> dict[str, Any]:
        """The window's reported fields (see the README); a metric without samples is None."""
        n_labeled = self.calibration.n
        n_lt = self.n_labeled_with_teacher
        acc_student = sum(self.calibration.correct) / n_labeled if n_labeled else None
        acc_student_lt = self.n_correct_student_lt / n_lt if n_lt else None
        acc_teacher = sum(self.teacher_calibration.correct) / n_lt if n_lt else None
        out: dict[str, Any] = {
            "n": self.n,
            "n_joined": self.fidelity.n_joined + self.generative.n_seq,
            "n_labeled": n_labeled,
            "teacher_sample_rate": (self.fidelity.n_joined + self.generative.n_seq) / self.n if self.n else None,
        }
        out.update(self.fidelity.result())
        out.update({
            "ece": self.calibration.ece(),
            "ece_teacher": self.teacher_calibration.ece(),
            "accuracy_student": acc_student,
            "accuracy_teacher": acc_teacher,
            "accuracy_delta": acc_student_lt - acc_teacher if acc_student_lt is not None and acc_teacher is not None else None,
            "n_labeled_with_teacher": n_lt,
        })
        out.update(self.drift.result(reference))
        out["mia"] = self.membership.result()
        out["n_audit"] = self.n_audit
        out["latency_p50_ms"] = self.latency.quantile(0.50)
        out["latency_p95_ms"] = self.latency.quantile(0.95)
        out["latency_p99_ms"] = self.latency.quantile(0.99)
        out["teacher_versions"] = dict(sorted(self.teacher_versions.items()))
        out["segments"] = {
            name: {"n": c[0], "n_joined": c[1], "agreement": c[2] / c[1] if c[1] else None, "n_labeled": c[3],
                   "accuracy": c[4] / c[3] if c[3] else None}
            for name, c in sorted(self.segments.items())}
        out["n_rejected"] = self.n_rejected
        out["n_late"] = self.n_late
        out["n_duplicate"] = self.n_duplicate
        out.update(self.generative.result())
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n, "n_rejected": self.n_rejected, "n_late": self.n_late,
            "n_duplicate": self.n_duplicate, "n_audit": self.n_audit,
            "fidelity": self.fidelity.to_dict(), "calibration": self.calibration.to_dict(),
            "n_labeled_with_teacher": self.n_labeled_with_teacher,
            "n_correct_student_lt": self.n_correct_student_lt,
            "teacher_calibration": self.teacher_calibration.to_dict(),
            "drift": self.drift.to_dict(), "membership": self.membership.to_dict(),
            "latency": self.latency.to_dict(),
            "teacher_versions": self.teacher_versions,
            "segments": self.segments,
            **({"generative": self.generative.to_dict()} if self.generative.active else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WindowState:
        return cls(
            n=data["n"], n_rejected=data["n_rejected"], n_late=data["n_late"],
            n_duplicate=data["n_duplicate"], n_audit=data["n_audit"],
            fidelity=FidelityState.from_dict(data["fidelity"]),
            calibration=CalibrationState.from_dict(data["calibration"]),
            n_labeled_with_teacher=data["n_labeled_with_teacher"],
            n_correct_student_lt=data["n_correct_student_lt"],
            teacher_calibration=CalibrationState.from_dict(data["teacher_calibration"]),
            drift=DriftState.from_dict(data["drift"]),
            membership=MembershipState.from_dict(data["membership"]),
            latency=QuantileSketch.from_dict(data["latency"]),
            teacher_versions=dict(data.get("teacher_versions", {})),
            segments={k: list(v) for k, v in data.get("segments", {}).items()},
            generative=GenerativeState.from_dict(data.get("generative")),
        )


def window_result(model: str, student_version: str, window_start_ms: int, window_ms: int,
                  state: WindowState, reference: Reference | None = None) -> dict[str, Any]:
    """One window's public record: identity first, then the fields of ``WindowState.result``."""
    out: dict[str, Any] = {
        "model": model,
        "student_version": student_version,
        "window_start": rfc3339(window_start_ms),
        "window_end": rfc3339(window_start_ms + window_ms),
    }
    out.update(state.result(reference))
    return out
