"""Distillation: the loss against a hand computation, training that improves fidelity, the gate, the registry."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kdwatch.collector.contract import Distribution
from kdwatch.collector.records import TransferRecord
from kdwatch.runner.distill import StudentMLP, TrainConfig, distil, distillation_loss, fidelity, to_arrays
from kdwatch.runner.registry import Registry


def _softmax(z: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def test_the_kd_loss_matches_a_hand_computation() -> None:
    student = [[1.0, 0.0, -1.0], [0.2, 0.4, 0.1]]
    teacher_probs = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]
    labels = [0, -1]  # the second example has no label: alpha = 1 for it
    alpha, t = 0.3, 2.0
    expected = 0.0
    for z, p, y in zip(student, teacher_probs, labels, strict=True):
        pt = _softmax([math.log(v) for v in p], t)  # softmax(ln p / T)
        ps = _softmax(z, t)
        kl = sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps, strict=True))
        if y >= 0:
            ce = -math.log(_softmax(z)[y])
            expected += (1 - alpha) * ce + alpha * t * t * kl
        else:
            expected += t * t * kl
    expected /= 2
    got = distillation_loss(torch.tensor(student), torch.log(torch.tensor(teacher_probs)), torch.tensor(labels), alpha, t)
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_alpha_zero_with_labels_is_plain_cross_entropy() -> None:
    z = torch.tensor([[2.0, -1.0], [0.0, 1.0]])
    y = torch.tensor([1, 1])
    got = distillation_loss(z, torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]])), y, 0.0, 3.0)
    assert float(got) == pytest.approx(float(torch.nn.functional.cross_entropy(z, y)), rel=1e-6)


def synthetic_transfer(n: int, seed: int = 0) -> list[TransferRecord]:
    """A teacher that is a fixed linear model over 4 features; the logged student guesses at random."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(4, 3)) * 2
    out = []
    for i in range(n):
        x = rng.normal(size=4)
        logits = x @ w
        log_p = logits - np.log(np.exp(logits).sum())
        student = rng.dirichlet(np.ones(3))
        out.append(TransferRecord("m", f"r{i}", 1_795_000_000_000 + i, "s1", {f"f{j}": float(x[j]) for j in range(4)} | {"tag": "a"},
                                  Distribution(np.exp(log_p), log_p), Distribution(student, None),
                                  int(np.argmax(logits)) if i % 2 else None))
    return out


def test_distilling_a_small_transfer_set_beats_an_untrained_student_and_is_promoted() -> None:
    data = to_arrays(synthetic_transfer(1_500), holdout=0.2)
    assert data.feature_names == ["f0", "f1", "f2", "f3"]  # the string feature is not an MLP input
    assert 200 < data.holdout.sum() < 400
    config = TrainConfig(epochs=30, seed=3)
    untrained = StudentMLP(4, config.hidden, 3)
    with torch.no_grad():
        log_s = torch.log_softmax(untrained(torch.from_numpy(data.x[data.holdout])), dim=1).double().numpy()
    before = fidelity(data.teacher_probs[data.holdout], data.teacher_log_probs[data.holdout], np.exp(log_s), log_s,
                      data.labels[data.holdout])
    epochs: list[dict[str, float]] = []
    result = distil(data, config, epochs.append)
    assert len(epochs) == 30
    assert result.candidate["agreement"] > 0.9 > before["agreement"]  # type: ignore[operator]
    assert result.candidate["kl_mean"] < before["kl_mean"]  # type: ignore[operator]
    assert result.current["agreement"] < 0.6  # type: ignore[operator]  # the random production student
    assert result.promoted
    # Seeded and deterministic: the same data and config train the same weights.
    again = distil(data, config)
    assert all(torch.equal(a, b) for a, b in zip(result.module.state_dict().values(), again.module.state_dict().values(), strict=True))


def test_the_gate_rejects_a_candidate_that_does_not_beat_the_current_student_by_the_margin() -> None:
    records = synthetic_transfer(600)
    for r in records:  # the production student already answers exactly like the teacher
        r.student = Distribution(r.teacher.probs.copy(), None)
    result = distil(to_arrays(records, 0.2), TrainConfig(epochs=3, promote_margin=0.01))
    assert result.current["agreement"] == 1.0
    assert not result.promoted


def test_the_registry_writes_a_verified_torchscript_export_and_moves_current(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    module = StudentMLP(4, (8,), 3, torch.arange(4.0), torch.full((4,), 2.0)).eval()
    version = registry.next_version("fraud/distil", "s1")
    assert version == "s1-kd1"
    registry.register("fraud/distil", version, module, {"parent_version": "s1", "metrics": {"agreement": 0.9}})
    registry.promote("fraud/distil", version)
    assert registry.current("fraud/distil") == "s1-kd1"
    assert registry.next_version("fraud/distil", "s1-kd1") == "s1-kd1-kd1"
    assert registry.next_version("fraud/distil", "s1") == "s1-kd2"
    meta = registry.metadata("fraud/distil", version)
    assert meta["parent_version"] == "s1" and set(meta["sha256"]) == {"model.pt", "model.torchscript"}
    scripted = registry.load_torchscript("fraud/distil", version)
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.allclose(scripted(x), module(x))
    with pytest.raises(FileExistsError):
        registry.register("fraud/distil", version, module, {})
    (tmp_path / "fraud_distil" / version / "model.torchscript").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        registry.load_torchscript("fraud/distil", version)


def test_the_gate_promotes_exactly_when_the_candidate_beats_an_imperfect_current_student_by_the_margin() -> None:
    records = synthetic_transfer(1_200)
    rng = np.random.default_rng(11)
    for r in records:  # the production student agrees with the teacher on about 80 % of requests
        if rng.random() < 0.8:
            r.student = Distribution(r.teacher.probs.copy(), None)
    data = to_arrays(records, 0.2)
    base = distil(data, TrainConfig(epochs=20, seed=5, promote_margin=0.0))
    gain = float(base.candidate["agreement"]) - float(base.current["agreement"])  # type: ignore[arg-type]
    assert 0.7 < float(base.current["agreement"]) < 0.9 and gain > 0.02, (base.current, base.candidate)  # type: ignore[arg-type]
    # The same seeded training, judged with a margin just under and just over what it gained.
    assert distil(data, TrainConfig(epochs=20, seed=5, promote_margin=gain - 0.005)).promoted
    assert not distil(data, TrainConfig(epochs=20, seed=5, promote_margin=gain + 0.005)).promoted
