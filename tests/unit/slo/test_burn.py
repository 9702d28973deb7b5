"""Burn-rate maths to the SRE workbook's numbers."""

from __future__ import annotations

import pytest

from kdwatch.slo.burn import (
    DAY_MS,
    budget_remaining,
    budget_spent_at_detection,
    burn_rate,
    default_windows,
    detection_time_ms,
)

H, M = 3_600_000, 60_000


@pytest.mark.parametrize(("severity", "long", "short", "rate", "spent"), [
    ("page", 1 * H, 5 * M, 14.4, 0.02),
    ("page", 6 * H, 30 * M, 6.0, 0.05),
    ("ticket", 1 * DAY_MS, 2 * H, 3.0, 0.10),
    ("ticket", 3 * DAY_MS, 6 * H, 1.0, 0.10),
])
def test_a_30_day_slo_alerts_with_the_workbook_pairs(severity: str, long: int, short: int, rate: float, spent: float) -> None:
    pairs = {(w.severity, w.long_ms, w.short_ms): w for w in default_windows(30 * DAY_MS)}
    window = pairs[(severity, long, short)]
    assert window.burn_rate == rate
    assert window.short_ms * 12 == window.long_ms
    assert budget_spent_at_detection(window, 30 * DAY_MS) == pytest.approx(spent)


def test_a_7_day_slo_scales_its_windows_and_keeps_its_rates() -> None:
    page = default_windows(7 * DAY_MS)[0]
    assert (page.long_ms, page.short_ms, page.burn_rate) == (840_000, 70_000, 14.4)
    assert budget_spent_at_detection(page, 7 * DAY_MS) == pytest.approx(0.02)


def test_a_99_9_slo_burning_at_100_percent_errors_pages_in_under_a_minute() -> None:
    # Workbook table 5-4: 1h window at 14.4, 100 % errors: detection 0.86 minutes.
    assert detection_time_ms(default_windows(30 * DAY_MS)[0], 0.999, 1.0) == pytest.approx(51_840)


@pytest.mark.parametrize(("bad", "total", "objective", "burn", "remaining"), [
    (1, 1000, 0.999, 1.0, 0.0),
    (0, 1000, 0.99, 0.0, 1.0),
    (144, 1000, 0.99, 14.4, -13.4),
    (5, 1000, 0.99, 0.5, 0.5),
])
def test_burn_rate_and_budget_remaining(bad: int, total: int, objective: float, burn: float, remaining: float) -> None:
    assert burn_rate(bad, total, objective) == pytest.approx(burn)
    assert budget_remaining(bad, total, objective) == pytest.approx(remaining)


def test_no_events_is_no_burn_not_zero_burn() -> None:
    assert burn_rate(0, 0, 0.99) is None and budget_remaining(0, 0, 0.99) is None
