"""Each metric against an independent implementation, on random inputs (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon
from scipy.special import log_softmax, rel_entr
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score, roc_curve
from statsmodels.stats.proportion import proportion_confint

from kdwatch.analyzer.calibration import CalibrationState
from kdwatch.analyzer.drift import Reference, psi
from kdwatch.analyzer.fidelity import FidelityState, js_divergence, kl_divergence, student_log_probs, teacher_log_probs, wilson_interval
from kdwatch.analyzer.membership import attack_result, clopper_pearson
from kdwatch.analyzer.sketch import QuantileSketch

seeds = st.integers(0, 2**32 - 1)


def random_probs(rng: np.random.Generator, n: int, k: int, zeros: bool = True) -> np.ndarray:
    p = rng.dirichlet(np.full(k, 0.5), size=n)
    if zeros:
        p[rng.random((n, k)) < 0.1] = 0.0
        p[p.sum(axis=1) == 0, 0] = 1.0
        p /= p.sum(axis=1, keepdims=True)
    return p


@given(seeds, st.integers(1, 50), st.integers(2, 12))
def test_kl_from_probabilities_equals_scipy_rel_entr_with_the_student_floor(seed: int, n: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    t, s = random_probs(rng, n, k), random_probs(rng, n, k)
    ours = kl_divergence(t, teacher_log_probs(t, None), student_log_probs(s, None))
    reference = rel_entr(t, np.maximum(s, 1e-12)).sum(axis=1)
    np.testing.assert_allclose(ours, reference, rtol=1e-9, atol=1e-12)


@given(seeds, st.integers(1, 50), st.integers(2, 12))
def test_kl_from_logits_uses_log_softmax_on_both_sides(seed: int, n: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    zt, zs = rng.normal(0, 8, (n, k)), rng.normal(0, 8, (n, k))
    lt, ls = log_softmax(zt, axis=1), log_softmax(zs, axis=1)
    ours = kl_divergence(np.exp(lt), lt, ls)
    reference = (np.exp(lt) * (lt - ls)).sum(axis=1)
    np.testing.assert_allclose(ours, reference, rtol=1e-9, atol=1e-12)


@given(seeds, st.integers(1, 50), st.integers(2, 12))
def test_js_equals_scipy_jensenshannon_squared(seed: int, n: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    t, s = random_probs(rng, n, k), random_probs(rng, n, k)
    reference = np.array([jensenshannon(a, b) ** 2 for a, b in zip(t, s, strict=True)])
    np.testing.assert_allclose(js_divergence(t, s), reference, rtol=1e-9, atol=1e-12)


@given(st.integers(0, 500), st.integers(1, 500))
def test_wilson_interval_equals_statsmodels(k: int, n: int) -> None:
    k = min(k, n)
    low, high = proportion_confint(k, n, alpha=0.05, method="wilson")
    ours = wilson_interval(k, n)
    assert ours is not None
    np.testing.assert_allclose(ours, (low, high), rtol=1e-9, atol=1e-12)


def ece_reference(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """A plain loop over the definition: equal-width bins, c = 1.0 in the last bin."""
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        in_bin = (confidence >= lo) & ((confidence < hi) if b < bins - 1 else (confidence <= hi))
        if in_bin.any():
            total += in_bin.sum() / confidence.size * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return total


@given(seeds, st.integers(1, 400), st.integers(2, 10))
def test_ece_equals_the_definition(seed: int, n: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    p = random_probs(rng, n, k, zeros=False)
    p[: n // 10] = np.eye(k)[0]  # some confidences exactly 1.0
    labels = rng.integers(k, size=n)
    confidence, correct = p.max(axis=1), p.argmax(axis=1) == labels
    state = CalibrationState()
    state.update(confidence, correct)
    assert state.ece() == pytest.approx(ece_reference(confidence, correct), rel=1e-9, abs=1e-11)


def psi_reference(ref: np.ndarray, cur: np.ndarray) -> float:
    edges = np.unique(np.quantile(ref, np.arange(1, 10) / 10))
    r = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=edges.size + 1) / ref.size
    c = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=edges.size + 1) / cur.size
    r, c = np.where(r == 0, 1e-4, r), np.where(c == 0, 1e-4, c)
    return float(np.sum((c - r) * np.log(c / r)))


@given(seeds, st.integers(20, 2000), st.integers(1, 2000), st.floats(-2, 2))
def test_psi_equals_a_plain_numpy_psi(seed: int, m: int, n: int, shift: float) -> None:
    rng = np.random.default_rng(seed)
    ref = np.round(rng.normal(0, 1, m), 1)  # rounding makes tied quantiles and empty bins
    cur = np.round(rng.normal(shift, 1, n), 1)
    reference = Reference.from_columns({"x": ref.tolist()})
    fb = reference.features["x"]
    ours = psi(fb.count(cur.tolist()).astype(float), np.asarray(fb.reference_counts, dtype=float))
    assert ours == pytest.approx(psi_reference(ref, cur), rel=1e-9, abs=1e-12)


@settings(deadline=None)
@given(seeds, st.integers(1, 300), st.integers(1, 300))
def test_membership_auc_and_low_fpr_tpr_equal_scikit_learn(seed: int, n1: int, n0: int) -> None:
    rng = np.random.default_rng(seed)
    members = np.round(rng.normal(0.3, 1, n1), 1)
    nonmembers = np.round(rng.normal(0, 1, n0), 1)
    y = np.r_[np.ones(n1), np.zeros(n0)]
    scores = np.r_[members, nonmembers]
    ours = attack_result(members, nonmembers)
    assert ours["auc"] == pytest.approx(roc_auc_score(y, scores), rel=1e-9)
    fpr, tpr, _ = roc_curve(y, scores, drop_intermediate=False)
    assert ours["advantage"] == pytest.approx(np.max(tpr - fpr), abs=1e-12)
    for key, limit in (("tpr_at_1pct_fpr", 0.01), ("tpr_at_0_1pct_fpr", 0.001)):
        assert ours[key] == pytest.approx(tpr[fpr <= limit].max(), abs=1e-12)


@given(st.integers(0, 300), st.integers(1, 300))
def test_clopper_pearson_equals_scipy_exact_interval(k: int, n: int) -> None:
    k = min(k, n)
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    assert clopper_pearson(k, n) == pytest.approx([ci.low, ci.high], rel=1e-9, abs=1e-12)


@given(seeds, st.integers(1, 3000))
def test_sketch_quantiles_are_within_one_percent_of_a_true_sample(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.lognormal(0, 2, n)
    sketch = QuantileSketch()
    sketch.update(values)
    ordered = np.sort(values)
    for q in (0.5, 0.95, 0.99):
        got = sketch.quantile(q)
        assert got is not None
        truth = ordered[int(np.floor(q * (n - 1)))]
        assert abs(got - truth) <= 0.01 * truth * (1 + 1e-9)


def test_sketch_agrees_with_the_ddsketch_package() -> None:
    from ddsketch import DDSketch

    rng = np.random.default_rng(0)
    values = rng.lognormal(1, 1.5, 5000)
    theirs = DDSketch(relative_accuracy=0.01)
    for v in values:
        theirs.add(float(v))
    ours = QuantileSketch()
    ours.update(values)
    for q in (0.1, 0.5, 0.9, 0.99):
        assert ours.quantile(q) == pytest.approx(theirs.get_quantile_value(q), rel=0.02)


def test_fidelity_result_is_null_without_joined_events() -> None:
    result = FidelityState().result()
    assert result["agreement"] is None and result["kl_mean"] is None and result["kl_p95"] is None


@settings(deadline=None, max_examples=30)
@given(seeds, st.integers(1, 400), st.integers(2, 10))
def test_ece_equals_torchmetrics_away_from_confidence_one(seed: int, n: int, k: int) -> None:
    import torch
    from torchmetrics.classification import MulticlassCalibrationError

    rng = np.random.default_rng(seed)
    p = random_probs(rng, n, k, zeros=False)
    p = np.minimum(p, 1 - 1e-6)  # torchmetrics keeps confidence 1.0 in a hidden extra bin (its issue 3510)
    p /= p.sum(axis=1, keepdims=True)
    labels = rng.integers(k, size=n)
    state = CalibrationState()
    state.update(p.max(axis=1), p.argmax(axis=1) == labels)
    metric = MulticlassCalibrationError(num_classes=k, n_bins=15, norm="l1")
    theirs = float(metric(torch.tensor(p, dtype=torch.float64), torch.tensor(labels)))
    # torchmetrics computes in float32 whatever the input dtype: agreement to float32 precision here,
    # and to 1e-9 with the float64 definition in test_ece_equals_the_definition.
    assert state.ece() == pytest.approx(theirs, rel=1e-4, abs=1e-6)
