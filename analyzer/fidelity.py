"""Teacher-student fidelity: agreement, KL(teacher || student) and Jensen-Shannon divergence.

All functions take stacked arrays of shape (n_events, n_classes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdwatch.analyzer.exact import fixed_sum, fixed_to_float
from kdwatch.analyzer.sketch import QuantileSketch

# 1e-12 floor: a student probability of 0 would make KL infinite for one bad event.
STUDENT_PROB_FLOOR = 1e-12
WILSON_Z = 1.959963984540054  # the 97.5% normal quantile: a 95% two-sided interval


def student_log_probs(probs: np.ndarray, log_probs: np.ndarray | None) -> np.ndarray:
    """ln s: the exact log-softmax when the student sent logits, else ln max(s, 1e-12)."""
    if log_probs is not None:
        return log_probs
    return np.log(np.maximum(probs, STUDENT_PROB_FLOOR))


def teacher_log_probs(probs: np.ndarray, log_probs: np.ndarray | None) -> np.ndarray:
    """ln t: exact from logits; from probabilities ln t where t > 0 (zero terms are masked later)."""
    if log_probs is not None:
        return log_probs
    return np.log(np.where(probs > 0, probs, 1.0))


def kl_divergence(teacher: np.ndarray, log_teacher: np.ndarray, log_student: np.ndarray) -> np.ndarray:
    """Per-row KL(t || s) = sum_i t_i (ln t_i - ln s_i), natural log; terms with t_i = 0 are 0."""
    terms = np.where(teacher > 0, teacher * (log_teacher - log_student), 0.0)
    return terms.sum(axis=1)


def js_divergence(teacher: np.ndarray, student: np.ndarray) -> np.ndarray:
    """Per-row Jensen-Shannon divergence (natural log): KL(t||m)/2 + KL(s||m)/2, m = (t+s)/2."""
    mid = (teacher + student) / 2.0
    safe_mid = np.where(mid > 0, mid, 1.0)

    def half_kl(p: np.ndarray) -> np.ndarray:
        return np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(safe_mid)), 0.0).sum(axis=1)

    return np.maximum((half_kl(teacher) + half_kl(student)) / 2.0, 0.0)


def agreement_mask(teacher: np.ndarray, student: np.ndarray) -> np.ndarray:
    """True where the top-1 classes match (ties resolve to the lowest index, as numpy's argmax)."""
    return np.argmax(teacher, axis=1) == np.argmax(student, axis=1)


def wilson_interval(successes: int, n: int, z: float = WILSON_Z) -> tuple[float, float] | None:
    """The Wilson score interval for a binomial proportion, or None without trials."""
    if n == 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class FidelityState:
    """Mergeable state over joined (prediction, teacher replay) pairs."""

    n_joined: int = 0
    n_agree: int = 0
    kl_sum: int = 0  # fixed-point, see analyzer.exact
    js_sum: int = 0
    kl_sketch: QuantileSketch = field(default_factory=QuantileSketch)

    def update(
        self,
        teacher: np.ndarray,
        log_teacher: np.ndarray,
        student: np.ndarray,
        log_student: np.ndarray,
    ) -> None:
        if teacher.shape[0] == 0:
            return
        kl = np.maximum(kl_divergence(teacher, log_teacher, log_student), 0.0)
        self.n_joined += int(teacher.shape[0])
        self.n_agree += int(agreement_mask(teacher, student).sum())
        self.kl_sum += fixed_sum(kl)
        self.js_sum += fixed_sum(js_divergence(teacher, student))
        self.kl_sketch.update(kl)

    def merge(self, other: FidelityState) -> None:
        self.n_joined += other.n_joined
        self.n_agree += other.n_agree
        self.kl_sum += other.kl_sum
        self.js_sum += other.js_sum
        self.kl_sketch.merge(other.kl_sketch)

    def result(self) -> dict[str, Any]:
        n = self.n_joined
        ci = wilson_interval(self.n_agree, n)
        return {
            "agreement": self.n_agree / n if n else None,
            "agreement_ci": list(ci) if ci else None,
            "kl_mean": fixed_to_float(self.kl_sum) / n if n else None,
            "kl_p50": self.kl_sketch.quantile(0.5),
            "kl_p95": self.kl_sketch.quantile(0.95),
            "js_mean": fixed_to_float(self.js_sum) / n if n else None,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"n_joined": self.n_joined, "n_agree": self.n_agree, "kl_sum": str(self.kl_sum),
                "js_sum": str(self.js_sum), "kl_sketch": self.kl_sketch.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FidelityState:
        return cls(data["n_joined"], data["n_agree"], int(data["kl_sum"]), int(data["js_sum"]),
                   QuantileSketch.from_dict(data["kl_sketch"]))
