"""Service level indicators of one window: (good, total) events, or a timeslice verdict."""

from __future__ import annotations

from typing import Any

from kdwatch.analyzer.window import WindowState
from kdwatch.slo.burn import bad_fraction_lower_bound
from kdwatch.slo.config import TIMESLICE_METRICS, EventsSli, TimeslicesSli

# Timeslice metrics that are proportions of their sample count (a Wilson bound applies).
_PROPORTIONS = ("agreement", "seq_agreement", "token_agreement")
# The sample count that decides "no data" for each timeslice metric.
_SAMPLES = {"ece": "n_labeled", "kl_mean": "n_joined", "agreement": "n_joined", "accuracy_delta": "n_labeled_with_teacher",
            "teacher_ppl": "n_tokens", "kl_rev_mean": "n_tokens", "seq_agreement": "n_joined", "token_agreement": "n_tokens"}


def events_good_total(sli: EventsSli, state: WindowState) -> tuple[int, int]:
    """Good and total events of an Occurrences SLI in one window.

    latency and kl count from the window's DDSketch, so the threshold holds to 1 % relative accuracy.
    """
    if sli.metric == "agreement":
        return state.fidelity.n_agree, state.fidelity.n_joined
    if sli.metric == "accuracy":
        return sum(state.calibration.correct), state.calibration.n
    if sli.metric == "token_agreement":  # good = agreeing tokens, over tokens
        return state.generative.n_tokens_agree, state.generative.n_tokens
    assert sli.threshold is not None
    if sli.metric == "kl_rev":  # good = a sequence whose mean s - p is at or below the threshold, over joined sequences
        return state.generative.seq_kl.count_at_most(sli.threshold), state.generative.seq_kl.count
    sketch = state.latency if sli.metric == "latency" else state.fidelity.kl_sketch
    return sketch.count_at_most(sli.threshold), sketch.count


def _lookup(result: dict[str, Any], metric: str) -> tuple[float | None, int]:
    if metric.startswith("psi."):
        feature = metric[4:]
        value = (result.get("psi") or {}).get(feature)
        return value, int((result.get("psi_n") or {}).get(feature) or 0)
    if metric == "mia.tpr_at_1pct_fpr":
        mia = result.get("mia") or {}
        return mia.get("tpr_at_1pct_fpr"), min(int(mia.get("n_member") or 0), int(mia.get("n_nonmember") or 0))
    return result.get(metric), int(result.get(_SAMPLES[metric]) or 0)


def timeslice_verdict(sli: TimeslicesSli, result: dict[str, Any], confidence: float = 0.0) -> bool | None:
    """True (good slice), False (bad) or None (no data: fewer than min_samples).

    With ``confidence`` > 0, a slice of a proportion (agreement) is bad only when the one-sided
    Wilson bound of the proportion is past the threshold too, given the slice's sample count: a
    window with 20 joined replays and 17 agreeing is not evidence of agreement under 0.9. The other
    metrics (ECE, KL, MIA TPR, accuracy delta, PSI) have no closed-form bound here; ``min_samples``
    (and for PSI ``margin_over_expected``) is their guard.
    """
    value, samples = _lookup(result, sli.metric)
    if value is None or samples < sli.min_samples:
        return None
    if confidence > 0 and sli.metric in _PROPORTIONS:
        agree = round(value * samples)
        bound = bad_fraction_lower_bound(float(samples - agree), float(samples), confidence)  # of the disagreeing share
        return 1.0 - bound >= sli.threshold  # bad only when even the upper bound of the proportion is below it
    if sli.metric.startswith("psi."):
        bad = value > sli.threshold
        if bad and sli.margin_over_expected is not None:
            expected = (result.get("psi_expected") or {}).get(sli.metric[4:]) or 0.0
            bad = value > expected + sli.margin_over_expected
        return not bad
    if TIMESLICE_METRICS[sli.metric] == "le":
        return value <= sli.threshold
    return value >= sli.threshold
