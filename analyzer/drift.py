"""Population stability index (PSI) against a frozen reference.

Numeric feature: inner edges = unique(numpy.quantile(reference, [0.1, ..., 0.9])) (linear method),
bin = searchsorted(edges, x, side="right"). Categorical feature (string values, and
``_predicted_class``): one bin per reference value plus one ``other`` bin. Proportions with zeros
replaced by 1e-4 (not renormalised); PSI = sum_b (cur_b - ref_b) ln(cur_b / ref_b).
psi_expected = (B - 1)(1/n + 1/m) is PSI's expectation under no drift with n window and m reference
samples, so small-sample noise can be told from drift.
Edges freeze with the reference, so a window's drift state is plain bin counts that merge by addition.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import orjson

# k / 10 rather than linspace: linspace gives 0.30000000000000004, which moves tied edges.
DECILES = np.arange(1, 10) / 10
# Empty bins would make ln(cur/ref) infinite; 1e-4 is the customary floor.
ZERO_PROPORTION = 1e-4
CONFIDENCE = "_confidence"
PREDICTED_CLASS = "_predicted_class"
# The output features of a generative student: its sequence's length and mean log-probability.
LENGTH = "_length"
MEAN_LOGPROB = "_mean_logprob"


def output_features(dist: Any, generation: Any) -> dict[str, float | str]:
    """A prediction's output features for PSI: top-1 confidence and class, or length and mean log-probability."""
    if generation is not None:
        return {LENGTH: float(generation.logprobs.shape[0]), MEAN_LOGPROB: float(generation.logprobs.mean())}
    return {CONFIDENCE: float(dist.probs.max()), PREDICTED_CLASS: str(int(np.argmax(dist.probs)))}


@dataclass(frozen=True)
class FeatureBins:
    """How one feature is binned: numeric inner edges, or categorical values (+ an other bin)."""

    name: str
    edges: tuple[float, ...] | None = None
    categories: tuple[str, ...] | None = None
    reference_counts: tuple[int, ...] = ()

    @property
    def n_bins(self) -> int:
        return len(self.edges) + 1 if self.edges is not None else len(self.categories or ()) + 1

    def bin_indices(self, values: Sequence[Any] | np.ndarray) -> np.ndarray:
        """Bin index of each value; values of the wrong type get -1 and are not counted.

        A float array (NaN = missing) is binned without a Python loop (the columnar path).
        """
        if isinstance(values, np.ndarray) and values.dtype.kind == "f":
            if self.edges is None:  # numbers are never a category's value
                return np.full(values.shape[0], -1, dtype=np.int64)
            if len(self.edges) <= 16:
                # searchsorted(edges, x, side="right") is the number of edges <= x: with nine edges,
                # nine vectorised comparisons are ~3x faster than a binary search per value.
                idx = np.zeros(values.shape[0], dtype=np.int64)
                for edge in self.edges:
                    idx += values >= edge
            else:
                idx = np.searchsorted(np.asarray(self.edges), values, side="right")
            return np.where(np.isnan(values), -1, idx)
        if self.edges is not None:
            numbers = np.array([v if isinstance(v, float | int) and not isinstance(v, bool) else np.nan for v in values], dtype=np.float64)
            idx = np.searchsorted(np.asarray(self.edges), numbers, side="right")
            return np.where(np.isnan(numbers), -1, idx)
        lookup = {c: i for i, c in enumerate(self.categories or ())}
        other = len(lookup)
        return np.array([lookup.get(v, other) if isinstance(v, str) else -1 for v in values], dtype=np.int64)

    def count(self, values: Sequence[Any] | np.ndarray) -> np.ndarray:
        idx = self.bin_indices(values)
        return np.bincount(idx[idx >= 0], minlength=self.n_bins)

    def count_classes(self, classes: np.ndarray, n_classes: int) -> np.ndarray:
        """Counts of predicted class indices (0..n_classes-1) binned as their text, like ``count``."""
        lookup = {c: i for i, c in enumerate(self.categories or ())}
        table = np.array([lookup.get(str(k), len(lookup)) for k in range(n_classes)], dtype=np.int64)
        return np.bincount(table[classes], minlength=self.n_bins)


def _numeric_bins(name: str, values: np.ndarray) -> FeatureBins:
    edges = tuple(float(e) for e in np.unique(np.quantile(values, DECILES)))
    bins = FeatureBins(name, edges=edges)
    return FeatureBins(name, edges=edges, reference_counts=tuple(int(c) for c in bins.count(values)))


def _categorical_bins(name: str, counts: Counter[str]) -> FeatureBins:
    categories = tuple(sorted(counts))
    # Every reference value has its own bin, so the "other" bin of the reference is empty.
    return FeatureBins(name, categories=categories, reference_counts=(*(counts[c] for c in categories), 0))


class ReferenceBuilder:
    """Accumulates reference values compactly (8 bytes a number, a count per category), then bins them."""

    def __init__(self) -> None:
        self.numbers: dict[str, array[float]] = {}
        self.strings: dict[str, Counter[str]] = {}

    def add(self, name: str, value: Any) -> None:
        if value is None:
            return
        if name == PREDICTED_CLASS or isinstance(value, str):
            self.strings.setdefault(name, Counter())[str(value)] += 1
        else:
            self.numbers.setdefault(name, array("d")).append(float(value))

    def build(self) -> Reference:
        """A feature is numeric when all its values are numbers, else categorical over their text."""
        features: dict[str, FeatureBins] = {}
        for name in sorted(set(self.numbers) | set(self.strings)):
            numbers = self.numbers.get(name)
            if name in self.strings:
                counts = Counter(self.strings[name])
                if numbers is not None:
                    counts.update(str(v) for v in numbers)
                features[name] = _categorical_bins(name, counts)
            elif numbers is not None and len(numbers):
                features[name] = _numeric_bins(name, np.frombuffer(numbers, dtype=np.float64))
        return Reference(features)


@dataclass(frozen=True)
class Reference:
    """The frozen baseline of one model: binning and reference counts per feature."""

    features: dict[str, FeatureBins]

    @classmethod
    def from_columns(cls, columns: dict[str, list[Any]]) -> Reference:
        """Build from reference columns; a feature is numeric when all its values are numbers."""
        builder = ReferenceBuilder()
        for name, values in columns.items():
            for value in values:
                builder.add(name, value)
        return builder.build()

    @cached_property
    def fingerprint(self) -> str:
        return hashlib.sha256(orjson.dumps(self.to_dict(), option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {name: {"edges": fb.edges, "categories": fb.categories, "reference_counts": fb.reference_counts}
                for name, fb in self.features.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Reference:
        return cls({
            name: FeatureBins(
                name,
                edges=tuple(spec["edges"]) if spec.get("edges") is not None else None,
                categories=tuple(spec["categories"]) if spec.get("categories") is not None else None,
                reference_counts=tuple(spec["reference_counts"]),
            )
            for name, spec in data.items()
        })


def psi(current_counts: np.ndarray, reference_counts: np.ndarray) -> float:
    cur = current_counts / current_counts.sum()
    ref = reference_counts / reference_counts.sum()
    cur = np.where(cur == 0, ZERO_PROPORTION, cur)
    ref = np.where(ref == 0, ZERO_PROPORTION, ref)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def psi_expected(n_bins: int, n: int, m: int) -> float:
    return (n_bins - 1) * (1.0 / n + 1.0 / m)


@dataclass
class DriftState:
    """Bin counts per feature, valid for the reference with ``fingerprint``."""

    fingerprint: str | None = None
    counts: dict[str, list[int]] = field(default_factory=dict)

    def update(self, reference: Reference, columns: Mapping[str, Iterable[Any]]) -> None:
        if self.fingerprint is None:
            self.fingerprint = reference.fingerprint
        elif self.fingerprint != reference.fingerprint:
            raise ValueError("window drift state was built against another reference")
        for name, fb in reference.features.items():
            values = columns.get(name)
            if values is None:
                continue
            counted = fb.count(values if isinstance(values, np.ndarray) else list(values))
            self.add_counts(name, counted)

    def add_counts(self, name: str, counted: np.ndarray) -> None:
        """Add a feature's bin counts (binned by the reference this state belongs to)."""
        if name in self.counts:
            self.counts[name] = [a + int(b) for a, b in zip(self.counts[name], counted, strict=True)]
        else:
            self.counts[name] = [int(b) for b in counted]

    def merge(self, other: DriftState) -> None:
        if other.fingerprint is None:
            return
        if self.fingerprint is None:
            self.fingerprint = other.fingerprint
        elif self.fingerprint != other.fingerprint:
            raise ValueError("cannot merge drift states built against different references")
        for name, counts in other.counts.items():
            mine = self.counts.get(name)
            self.counts[name] = list(counts) if mine is None else [a + b for a, b in zip(mine, counts, strict=True)]

    def result(self, reference: Reference | None) -> dict[str, Any]:
        if reference is None or self.fingerprint not in (None, reference.fingerprint):
            return {"psi": None, "psi_expected": None, "psi_n": None}
        values: dict[str, float | None] = {}
        expected: dict[str, float | None] = {}
        sizes: dict[str, int] = {}
        for name, fb in reference.features.items():
            counts = np.asarray(self.counts.get(name, [0] * fb.n_bins), dtype=np.float64)
            ref = np.asarray(fb.reference_counts, dtype=np.float64)
            n, m = int(counts.sum()), int(ref.sum())
            sizes[name] = n
            values[name] = psi(counts, ref) if n else None
            expected[name] = psi_expected(fb.n_bins, n, m) if n else None
        return {"psi": values, "psi_expected": expected, "psi_n": sizes}

    def to_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "counts": self.counts}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DriftState:
        return cls(data["fingerprint"], {k: list(v) for k, v in data["counts"].items()})
