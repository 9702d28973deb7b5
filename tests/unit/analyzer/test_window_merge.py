"""state(A ∪ B) = merge(state(A), state(B)): splits across partitions, order and serialisation."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from kdwatch.analyzer.drift import Reference
from kdwatch.analyzer.window import WindowState
from kdwatch.collector.contract import Distribution, Prediction


def events(seed: int, n: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        s = rng.dirichlet(np.ones(4))
        out.append({
            "p": Prediction(f"r{i}", "m", "s1", 0, Distribution(s, None), latency_ms=float(rng.lognormal(2, 1)),
                            features={"x": float(rng.normal()), "c": str(rng.choice(["a", "b", "z"]))}),
            "t": Distribution(rng.dirichlet(np.ones(4)), None) if rng.random() < 0.5 else None,
            "y": int(rng.integers(4)) if rng.random() < 0.5 else None,
            "audit": bool(rng.random() < 0.2),
        })
    return out


REFERENCE = Reference.from_columns({
    "x": list(np.random.default_rng(99).normal(size=500)), "c": ["a", "b"] * 250,
    "_confidence": list(np.random.default_rng(98).uniform(0.25, 1, 500)), "_predicted_class": ["0", "1", "2", "3"] * 125,
})


def build(evs: list[dict[str, Any]]) -> WindowState:
    state = WindowState()
    audit = [e for e in evs if e["audit"]]
    normal = [e for e in evs if not e["audit"]]
    state.add_predictions([e["p"] for e in normal], REFERENCE)
    joined = [e for e in normal if e["t"] is not None]
    state.add_pairs([e["t"] for e in joined], [e["p"].dist for e in joined])
    labelled = [e for e in normal if e["y"] is not None]
    state.add_labels([e["p"].dist for e in labelled], [e["y"] for e in labelled])
    both = [e for e in labelled if e["t"] is not None]
    state.add_labels_with_teacher([e["t"] for e in both], [e["p"].dist for e in both], [e["y"] for e in both])
    state.add_audit([e["p"].request_id for e in audit], [e["p"].dist for e in audit],
                    [e["y"] if e["y"] is not None else 0 for e in audit], [e["member"] for e in audit])
    return state


def roundtrip(state: WindowState) -> WindowState:
    return WindowState.from_dict(orjson.loads(orjson.dumps(state.to_dict())))


@settings(deadline=None, max_examples=40)
@given(st.integers(0, 2**32 - 1), st.integers(0, 300), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_merging_any_split_equals_the_one_shot_state(seed: int, n: int, parts: int, split_seed: int) -> None:
    evs = events(seed, n)
    # Audit membership depends on position; fix it before splitting.
    for i, e in enumerate([e for e in evs if e["audit"]]):
        e["member"] = i % 2 == 0
    one_shot = build(evs)
    assignment = np.random.default_rng(split_seed).integers(parts, size=n)
    pieces = [roundtrip(build([e for e, a in zip(evs, assignment, strict=True) if a == p])) for p in range(parts)]
    merged = WindowState()
    for piece in reversed(pieces):
        merged.merge(piece)
    assert merged.result(REFERENCE) == roundtrip(one_shot).result(REFERENCE)


def test_results_of_an_empty_window_are_null_not_zero() -> None:
    r = WindowState().result(REFERENCE)
    assert r["n"] == 0
    for field in ("agreement", "kl_mean", "ece", "accuracy_delta", "mia", "latency_p99_ms", "teacher_sample_rate"):
        assert r[field] is None, field
    assert all(v is None for v in r["psi"].values())
