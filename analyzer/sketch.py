"""A mergeable quantile sketch with bounded relative error (the DDSketch algorithm).

Masson, Rim and Lee, "DDSketch: a fast and fully-mergeable quantile sketch with relative-error
guarantees" (VLDB 2019). Values are counted in logarithmic buckets ``ceil(log_gamma(x))`` with
gamma = (1 + a) / (1 - a), so every quantile is returned within relative error ``a`` of a true
sample at that rank. Bucket counts are integers: merging is exact, associative and commutative.
Written here rather than taken from the ``ddsketch`` package because the window state needs a
vectorised bulk insert and a plain JSON form; tests check it against that package and numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

RELATIVE_ACCURACY = 0.01
# Values at or below this are counted in the zero bucket (KL of identical distributions, 0 ms).
MIN_POSITIVE = 1e-9


@dataclass
class QuantileSketch:
    relative_accuracy: float = RELATIVE_ACCURACY
    bins: dict[int, int] = field(default_factory=dict)
    zero_count: int = 0

    @property
    def gamma(self) -> float:
        return (1 + self.relative_accuracy) / (1 - self.relative_accuracy)

    @property
    def count(self) -> int:
        return self.zero_count + sum(self.bins.values())

    def update(self, values: np.ndarray) -> None:
        """Add non-negative values (tiny negatives from rounding count as zero)."""
        x = np.asarray(values, dtype=np.float64).ravel()
        if x.size == 0:
            return
        positive = x[x > MIN_POSITIVE]
        self.zero_count += int(x.size - positive.size)
        if positive.size:
            keys = np.ceil(np.log(positive) / math.log(self.gamma)).astype(np.int64)
            unique, counts = np.unique(keys, return_counts=True)
            for key, count in zip(unique.tolist(), counts.tolist(), strict=True):
                self.bins[key] = self.bins.get(key, 0) + count

    def merge(self, other: QuantileSketch) -> None:
        if other.relative_accuracy != self.relative_accuracy:
            raise ValueError("cannot merge sketches of different relative accuracy")
        self.zero_count += other.zero_count
        for key, count in other.bins.items():
            self.bins[key] = self.bins.get(key, 0) + count

    def quantile(self, q: float) -> float | None:
        """The value at quantile ``q`` (lower rank, as DDSketch), or None when empty."""
        total = self.count
        if total == 0:
            return None
        rank = q * (total - 1)
        seen = self.zero_count
        if seen > rank:
            return 0.0
        gamma = self.gamma
        for key in sorted(self.bins):
            seen += self.bins[key]
            if seen > rank:
                return 2.0 * gamma**key / (gamma + 1.0)
        return 2.0 * gamma ** max(self.bins) / (gamma + 1.0)

    def count_at_most(self, threshold: float) -> int:
        """Values at or below ``threshold``, to the sketch's relative accuracy (bucket representatives)."""
        if threshold < 0:
            return 0
        gamma = self.gamma
        return self.zero_count + sum(c for k, c in self.bins.items() if 2.0 * gamma**k / (gamma + 1.0) <= threshold)

    def to_dict(self) -> dict[str, Any]:
        keys = sorted(self.bins)
        return {"a": self.relative_accuracy, "zero": self.zero_count, "keys": keys, "counts": [self.bins[k] for k in keys]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantileSketch:
        return cls(data["a"], dict(zip(data["keys"], data["counts"], strict=True)), data["zero"])
