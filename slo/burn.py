"""Error budgets and burn rates (Google SRE workbook, chapter 5).

Burn rate over a window W = (bad / total over W) / (1 - objective).
Budget remaining over the period = 1 - (bad / total over the period) / (1 - objective).
Default multi-window pairs for a 30-day period: page at 14.4 over 1h and 5m or 6 over 6h and 30m;
ticket at 3 over 1d and 2h or 1 over 3d and 6h. For another period the windows scale with it (the
short window stays 1/12 of the long one) and the rates stay, so each pair still fires after the same
share of the budget is spent.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdwatch.durations import format_duration_ms, parse_duration_ms

DAY_MS = 86_400_000
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
