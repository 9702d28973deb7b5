"""Error budgets and burn rates (Google SRE workbook, chapter 5).

Burn rate over a window W = (bad / total over W) / (1 - objective).
Budget remaining over the period = 1 - (bad / total over the period) / (1 - objective).
Default multi-window pairs for a 30-day period: page at 14.4 over 1h and 5m or 6 over 6h and 30m;
ticket at 3 over 1d and 2h or 1 over 3d and 6h. For another period the windows scale with it (the
short window stays 1/12 of the long one) and the rates stay, so each pair still fires after the same
share of the budget is spent.

The significance guard: a pair's long window counts as burning only when the one-sided exact
(Clopper-Pearson) lower bound of its bad fraction, at ``confidence``, is above ``rate * (1 - objective)``. With few events
(a stream that just started, low traffic) a handful of bad events is not evidence of a burn; with
many, the bound is close to the fraction and the pair fires as the workbook's does.
``confidence = 0`` is the plain workbook rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from scipy.special import betaincinv

from kdwatch.durations import format_duration_ms, parse_duration_ms

DAY_MS = 86_400_000
# The guard's default: one-sided 99.9 %. Alerts are evaluated every window for days, so the per-check
# error must be small for the per-stream false-alert rate to be (benchmarks/alert_quality.py, README).
DEFAULT_CONFIDENCE = 0.999
Counts = TypeVar("Counts", float, np.ndarray)
WORKBOOK_PERIOD_MS = 30 * DAY_MS
# (severity, long, short, burn rate) for a 30-day period.
WORKBOOK_PAIRS = (
    ("page", 3_600_000, 300_000, 14.4),
    ("page", 6 * 3_600_000, 1_800_000, 6.0),
    ("ticket", DAY_MS, 2 * 3_600_000, 3.0),
    ("ticket", 3 * DAY_MS, 6 * 3_600_000, 1.0),
)


@dataclass(frozen=True)
class BurnWindow:
    """One alerting condition: both windows above ``burn_rate``."""

    severity: str
    long_ms: int
    short_ms: int
    burn_rate: float

    @property
    def tier(self) -> str:
        return f"{format_duration_ms(self.long_ms)}/{format_duration_ms(self.short_ms)}"


def default_windows(period_ms: int) -> tuple[BurnWindow, ...]:
    scale = period_ms / WORKBOOK_PERIOD_MS
    return tuple(BurnWindow(sev, round(long * scale), round(short * scale), rate) for sev, long, short, rate in WORKBOOK_PAIRS)


def windows_from_config(period: str, pairs: tuple[object, ...] | None) -> tuple[BurnWindow, ...]:
    if pairs is None:
        return default_windows(parse_duration_ms(period))
    return tuple(BurnWindow(p.severity, parse_duration_ms(p.long), parse_duration_ms(p.short), p.burn_rate)  # type: ignore[attr-defined]
                 for p in pairs)


def burn_rate(bad: float, total: float, objective: float) -> float | None:
    """(bad / total) / (1 - objective); None without events."""
    if total <= 0:
        return None
    return (bad / total) / (1.0 - objective)


def budget_remaining(bad: float, total: float, objective: float) -> float | None:
    if total <= 0:
        return None
    return 1.0 - (bad / total) / (1.0 - objective)


def budget_spent_at_detection(window: BurnWindow, period_ms: int) -> float:
    """Share of the period's budget burnt when a pair fires at exactly its rate: rate * long / period."""
    return window.burn_rate * window.long_ms / period_ms


def detection_time_ms(window: BurnWindow, objective: float, error_rate: float) -> float | None:
    """Workbook detection time of a constant ``error_rate`` for a pair: long * rate * budget / error_rate."""
    if error_rate <= 0:
        return None
    return window.long_ms * window.burn_rate * (1.0 - objective) / error_rate


def bad_fraction_lower_bound(bad: Counts, total: Counts, confidence: float) -> Counts:
    """One-sided exact (Clopper-Pearson) lower bound of bad / total at ``confidence``; 0 without bad events.

    Exact rather than Wilson: with few events and a small threshold (a 99 % objective's ticket
    fires above 1 %), Wilson's bound is anti-conservative (2 bad of the first 10 events gives a
    99.9 % Wilson bound of 3.1 % where the exact one is 0.45 %), and a stream is checked every window.
    Scalars or numpy arrays.
    """
    bad_arr = np.asarray(bad, dtype=np.float64)
    total_arr = np.asarray(total, dtype=np.float64)
    x = np.clip(bad_arr, 0.0, total_arr)
    with np.errstate(invalid="ignore", divide="ignore"):
        bound = betaincinv(np.maximum(x, 1e-300), total_arr - x + 1.0, 1.0 - confidence)
    bound = np.where((x > 0) & (total_arr > 0), bound, 0.0)
    return bound if isinstance(bad, np.ndarray) or isinstance(total, np.ndarray) else float(bound)  # type: ignore[return-value]


def long_window_burning(bad: Counts, total: Counts, objective: float, rate: float, confidence: float) -> Counts:
    """Whether a pair's long window burns faster than ``rate``: significantly so when ``confidence`` > 0.

    The plain rule is bad / total > rate * (1 - objective); the guarded one asks the same of the
    bad fraction's lower confidence bound. Scalars or numpy arrays (the benchmark evaluates many
    streams at once with this very function).
    """
    threshold = rate * (1.0 - objective)
    scalar = np.ndim(bad) == 0 and np.ndim(total) == 0
    bad_arr, total_arr = np.broadcast_arrays(np.atleast_1d(np.asarray(bad, dtype=np.float64)),
                                             np.atleast_1d(np.asarray(total, dtype=np.float64)))
    out = (total_arr > 0) & (bad_arr > threshold * total_arr)  # the plain rule
    if confidence > 0 and out.any():
        # The bound is below the fraction: only where the plain rule holds can the guarded one.
        out[out] = bad_fraction_lower_bound(bad_arr[out], total_arr[out], confidence) > threshold
    return bool(out[0]) if scalar else out  # type: ignore[return-value]
