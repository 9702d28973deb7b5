"""The significance guard and the resolve hold: quiet on healthy models from a cold start, prompt on incidents."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from statsmodels.stats.proportion import proportion_confint

from kdwatch.analyzer.window import WindowState
from kdwatch.slo.burn import DEFAULT_CONFIDENCE, bad_fraction_lower_bound, long_window_burning
from kdwatch.slo.config import TimeslicesSli, parse_slo_file
from kdwatch.slo.engine import WindowInput, backtest
from kdwatch.slo.sli import timeslice_verdict
from tests.unit.slo.test_engine import MIN, T0, alerts, minute_of


def stream(minutes: int, per_minute: int, good_rate: float, incident: tuple[int, int, float] | None = None,
           seed: int = 0) -> list[WindowInput]:
    """Joined events per minute agreeing at ``good_rate`` (binomial), ``incident``: (start, end, rate)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(minutes):
        rate = incident[2] if incident is not None and incident[0] <= i < incident[1] else good_rate
        state = WindowState()
        state.fidelity.n_joined = per_minute
        state.fidelity.n_agree = int(rng.binomial(per_minute, rate))
        out.append(WindowInput("m", "s1", T0 + (i + 1) * MIN, state, {}))
    return out


def slo_file(objective: float, **alerting: Any) -> Any:
    return parse_slo_file({"slos": [{"name": "agreement", "model": "m", "objective": objective,
                                     "sli": {"events": {"metric": "agreement"}}, "alerting": alerting}]})


@pytest.mark.parametrize(("bad", "total", "confidence"), [
    (1, 10, 0.999), (2, 10, 0.999), (10, 10, 0.999), (3, 1_000, 0.95), (150, 10_000, 0.999), (7, 43_200, 0.9),
])
def test_the_lower_bound_is_clopper_pearsons_exact_one_sided_bound(bad: int, total: int, confidence: float) -> None:
    expected = proportion_confint(bad, total, alpha=2 * (1 - confidence), method="beta")[0]
    assert bad_fraction_lower_bound(float(bad), float(total), confidence) == pytest.approx(expected, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize(("bad", "total", "confidence", "burning"), [
    (2, 10, 0.999, False),  # 20 % of ten events: the exact bound is 0.48 %, not above a 99 % objective's 1 %
    (2, 10, 0.0, True),  # the plain workbook rule: 20 % > 1 %
    (0, 0, 0.999, False),  # no events, no burn
    (300, 10_000, 0.999, True),  # 3 % of ten thousand: bound 2.5 %, well above 1 %
    (105, 10_000, 0.999, False),  # 1.05 %: above 1 %, but not significantly
])
def test_a_99_percent_ticket_at_rate_1_needs_the_bound_above_1_percent(bad: int, total: int, confidence: float, burning: bool) -> None:
    assert long_window_burning(float(bad), float(total), 0.99, 1.0, confidence) is burning


@pytest.mark.parametrize("per_minute", [10, 100, 1_000])
def test_a_healthy_99_5_percent_model_stays_quiet_from_a_cold_start_where_the_plain_rule_tickets(per_minute: int) -> None:
    windows = stream(24 * 60, per_minute, 0.995, seed=per_minute)
    assert backtest(slo_file(0.99), windows) == []
    if per_minute == 10:  # the symptom of the issue: the plain workbook rule fires on this healthy stream
        assert alerts(backtest(slo_file(0.99, confidence=0), windows), status="firing")


def test_a_93_percent_model_against_an_85_percent_objective_stays_quiet_at_stream_start() -> None:
    windows = stream(6 * 60, 20, 0.93, seed=3)
    assert backtest(slo_file(0.85), windows) == []


def test_an_incident_at_20_percent_errors_pages_within_10_percent_of_the_plain_rule() -> None:
    windows = stream(6 * 60, 1_000, 0.995, incident=(120, 240, 0.80), seed=4)
    guarded = alerts(backtest(slo_file(0.99), windows), severity="page", status="firing")
    plain = alerts(backtest(slo_file(0.99, confidence=0), windows), severity="page", status="firing")
    delay, plain_delay = minute_of(guarded[0]) - 120, minute_of(plain[0]) - 120
    assert 0 < plain_delay <= delay <= 1.1 * plain_delay, (delay, plain_delay)


def test_one_incident_gives_one_firing_and_one_resolution_per_fingerprint() -> None:
    # 20 % errors in 10-minute bursts with 3 quiet minutes between: the 5-minute short window dips
    # below the rate now and then, never for the 5-minute hold, so the page does not flap.
    windows = stream(5 * 60, 1_000, 0.995, seed=5)
    for i in range(60, 180):
        if (i - 60) % 13 < 10:
            windows[i].state.fidelity.n_agree = 800
    notes = backtest(slo_file(0.99), windows)
    by_fingerprint: dict[str, list[str]] = {}
    for note in alerts(notes):
        by_fingerprint.setdefault(note["fingerprint"], []).append(note["status"])
    assert by_fingerprint, notes
    for statuses in by_fingerprint.values():  # never fires again after resolving (tiers still burning at the end stay firing)
        assert "firing" not in statuses[statuses.index("resolved"):] if "resolved" in statuses else statuses == ["firing"], statuses
    page = [n["status"] for n in alerts(notes, severity="page", tier="1h/5m")]
    assert page == ["firing", "resolved"]
    no_hold = alerts(backtest(slo_file(0.99, resolve_hold="0s"), windows), severity="page", tier="1h/5m")
    assert len(no_hold) > 2  # without the hold the same incident flaps


@pytest.mark.parametrize(("agree", "samples", "good"), [
    (17, 20, True),  # 85 % of 20 below a 0.9 threshold: not evidence, the slice is not bad
    (800, 1_000, False),  # 80 % of 1,000: significantly below
    (950, 1_000, True),
])
def test_an_agreement_slice_is_bad_only_when_significantly_below_its_threshold(agree: int, samples: int, good: bool) -> None:
    sli = TimeslicesSli(metric="agreement", threshold=0.9)
    result = {"agreement": agree / samples, "n_joined": samples}
    assert timeslice_verdict(sli, result, DEFAULT_CONFIDENCE) is good
    assert timeslice_verdict(sli, result, 0.0) is (agree / samples >= 0.9)


@pytest.mark.parametrize(("over_expected", "retrains"), [(True, False), (False, True)])
def test_psi_retrains_compare_the_excess_over_the_no_drift_expectation(over_expected: bool, retrains: bool) -> None:
    config = parse_slo_file({"retrain": [{"model": "m", "when": [{"psi_feature": "f", "psi_above": 0.1, "consecutive_windows": 3,
                                                                   "psi_over_expected": over_expected}]}]})
    # Small windows: PSI 0.25 of which 0.2 is what identical distributions give at these sample sizes.
    windows = [WindowInput("m", "s1", T0 + (i + 1) * MIN, WindowState(), {"psi": {"f": 0.25}, "psi_expected": {"f": 0.2}})
               for i in range(5)]
    assert any(n["type"] == "retrain" for n in backtest(config, windows)) is retrains


def test_the_default_confidence_is_documented_as_99_9_percent() -> None:
    assert DEFAULT_CONFIDENCE == 0.999
    assert parse_slo_file({"slos": [{"name": "a", "model": "m", "objective": 0.9, "sli": {"events": {"metric": "agreement"}}}]}
                          ).slos[0].alerting.confidence == DEFAULT_CONFIDENCE
