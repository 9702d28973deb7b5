"""Expected calibration error (Guo et al. 2017) with 15 equal-width bins on top-1 confidence.

bin = min(floor(c * 15), 14), so a confidence of exactly 1.0 lands in the last bin (torchmetrics
keeps it in a hidden extra bin; this definition differs there on purpose).
ECE = sum_b (n_b / N) |acc_b - conf_b| = (1 / N) sum_b |correct_b - sum of confidences_b|.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdwatch.analyzer.exact import fixed_sum, fixed_to_float

N_BINS = 15


def confidence_bins(confidence: np.ndarray) -> np.ndarray:
    return np.minimum(np.floor(confidence * N_BINS).astype(np.int64), N_BINS - 1)


@dataclass
class CalibrationState:
    """Per-bin counts, correct counts and (fixed-point) confidence sums: merge is addition."""

    count: list[int] = field(default_factory=lambda: [0] * N_BINS)
    correct: list[int] = field(default_factory=lambda: [0] * N_BINS)
    confidence_sum: list[int] = field(default_factory=lambda: [0] * N_BINS)

    def update(self, confidence: np.ndarray, is_correct: np.ndarray) -> None:
        if confidence.size == 0:
            return
        bins = confidence_bins(confidence)
        for b in np.unique(bins).tolist():
            in_bin = bins == b
            self.count[b] += int(in_bin.sum())
            self.correct[b] += int(is_correct[in_bin].sum())
            self.confidence_sum[b] += fixed_sum(confidence[in_bin])

    def merge(self, other: CalibrationState) -> None:
        for b in range(N_BINS):
            self.count[b] += other.count[b]
            self.correct[b] += other.correct[b]
            self.confidence_sum[b] += other.confidence_sum[b]

    @property
    def n(self) -> int:
        return sum(self.count)

    def ece(self) -> float | None:
        n = self.n
        if n == 0:
            return None
        gap = sum(abs(self.correct[b] - fixed_to_float(self.confidence_sum[b])) for b in range(N_BINS))
        return gap / n

    def reliability(self) -> list[dict[str, Any]]:
        """Per non-empty bin: its range, count, accuracy and mean confidence (the reliability diagram)."""
        return [
            {"bin": b, "low": b / N_BINS, "high": (b + 1) / N_BINS, "n": self.count[b],
             "accuracy": self.correct[b] / self.count[b],
             "confidence": fixed_to_float(self.confidence_sum[b]) / self.count[b]}
            for b in range(N_BINS) if self.count[b]
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "correct": self.correct, "confidence_sum": [str(s) for s in self.confidence_sum]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationState:
        return cls(list(data["count"]), list(data["correct"]), [int(s) for s in data["confidence_sum"]])
