"""Real data for the closed-loop demo: scikit-learn's digits (1,797 images of 8x8 pixels, 10 classes).

A teacher (a wide PyTorch MLP) is trained on part of the images; a small student is distilled from it
with the runner's own loss. Traffic replays images (optionally shifted: Gaussian pixel noise) as
contract-v1 records: the student's prediction, the teacher's replay for a sample of requests, a
delayed true label for another sample, and audit replays of training members and non-members.
Everything is seeded, so a run is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import orjson
import torch
import torch.nn.functional as F

from kdwatch.generator import ArrivalQueue
from kdwatch.runner.distill import StudentMLP, TrainConfig, TransferArrays, distil

FEATURES = [f"px{i:02d}" for i in range(64)]
Predictor = Callable[[np.ndarray], np.ndarray]  # float32 (n, 64) -> log-probabilities (n, 10)


@dataclass
class Digits:
    x: np.ndarray  # (1797, 64) float32 in [0, 1]
    y: np.ndarray  # (1797,) int
    members: np.ndarray  # indices the teacher and the first student were trained on
    outsiders: np.ndarray  # indices never trained on


def load(seed: int = 0, member_share: float = 0.6) -> Digits:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(len(x) * member_share)
    return Digits(x, data.target.astype(np.int64), np.sort(order[:cut]), np.sort(order[cut:]))


def predictor(module: torch.nn.Module) -> Predictor:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return F.log_softmax(module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))), dim=1).double().numpy()
    return run


def train_teacher(d: Digits, seed: int = 0, epochs: int = 60) -> StudentMLP:
    """A wide MLP trained on the member images with cross-entropy (about 97-98 % accurate on the rest)."""
    torch.manual_seed(seed)
    teacher = StudentMLP(64, (256, 128), 10)
    optimiser = torch.optim.AdamW(teacher.parameters(), lr=2e-3, weight_decay=1e-4)
    x, y = torch.from_numpy(d.x[d.members]), torch.from_numpy(d.y[d.members])
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            batch = order[start:start + 64]
            optimiser.zero_grad()
            F.cross_entropy(teacher(x[batch]), y[batch]).backward()
            optimiser.step()
    return teacher.eval()


def distil_first_student(d: Digits, teacher: Predictor, config: TrainConfig) -> StudentMLP:
    """The production student: distilled from the teacher on the member images (labels known, alpha as configured)."""
    log_t = teacher(d.x[d.members])
    holdout = np.zeros(len(d.members), dtype=bool)
    holdout[::10] = True
    arrays = TransferArrays(FEATURES, d.x[d.members], log_t, np.exp(log_t), np.exp(log_t), d.y[d.members], holdout)
    return distil(arrays, config.model_copy(update={"promote_margin": -1.0})).module.eval()


def shift(x: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian pixel noise (sensor noise, a new camera): the distribution shift of the demo."""
    if noise == 0:
        return x
    return np.clip(x + rng.normal(0.0, noise, x.shape), 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class Phase:
    model: str
    student_version: str
    start_ms: int
    n: int
    interval_ms: int = 1_000
    noise: float = 0.0
    teacher_rate: float = 0.5
    label_rate: float = 0.3
    audits: int = 0  # audit replays of members and as many of outsiders
    teacher_version: str = "t1"
    seed: int = 0


def _logits(row: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in row]


def traffic(d: Digits, phase: Phase, student: Predictor, teacher: Predictor | None) -> Iterator[tuple[str, str, bytes]]:
    """(kind, request_id, value) in arrival order: each replay 2 s after its prediction, labels 30 s to 2 min later.

    ``teacher=None`` leaves the replays to someone else (the replayer).
    """
    rng = np.random.default_rng(phase.seed)
    picks = rng.integers(0, len(d.x), phase.n)
    x = shift(d.x[picks], phase.noise, rng)
    log_s = student(x)
    log_t = teacher(x) if teacher is not None else None
    pending = ArrivalQueue()
    for ts, rid, value in audits(d, phase, student, rng):  # interleaved by event time, so never late
        pending.push(ts, "prediction", rid, value)
    for i in range(phase.n):
        ts = phase.start_ms + i * phase.interval_ms
        rid = f"{phase.model}-{phase.student_version}-{phase.seed}-{i}"
        features = {name: round(float(v), 4) for name, v in zip(FEATURES, x[i], strict=True)}
        yield "prediction", rid, orjson.dumps({
            "request_id": rid, "model": phase.model, "student_version": phase.student_version, "ts": ts,
            "latency_ms": round(float(rng.lognormal(1.5, 0.3)), 3), "features": features, "logits": _logits(log_s[i])})
        if log_t is not None and rng.random() < phase.teacher_rate:
            pending.push(ts + 2_000, "teacher", rid, orjson.dumps({
                "request_id": rid, "model": phase.model, "teacher_version": phase.teacher_version, "ts": ts + 2_000,
                "logits": _logits(log_t[i])}))
        if rng.random() < phase.label_rate:
            delay = int(rng.uniform(30_000, 120_000))
            pending.push(ts + delay, "label", rid, orjson.dumps({
                "request_id": rid, "model": phase.model, "label": int(d.y[picks[i]]), "ts": ts + delay}))
        yield from pending.due(ts)
    yield from pending.drain()


def audits(d: Digits, phase: Phase, student: Predictor, rng: np.random.Generator) -> Iterator[tuple[int, str, bytes]]:
    """Audit replays: the student's answer on training members and on outsiders, with their labels."""
    if not phase.audits:
        return
    span = phase.n * phase.interval_ms
    for kind, pool in (("member", d.members), ("nonmember", d.outsiders)):
        chosen = rng.choice(pool, size=min(phase.audits, len(pool)), replace=False)
        log_s = student(d.x[chosen])
        for j, index in enumerate(chosen):
            rid = f"audit-{phase.model}-{phase.student_version}-{phase.seed}-{kind}-{j}"
            ts = phase.start_ms + int(j * span / len(chosen))
            yield ts, rid, orjson.dumps({
                "request_id": rid, "model": phase.model, "student_version": phase.student_version,
                "ts": ts, "logits": _logits(log_s[j]), "label": int(d.y[index]), "audit": kind})


def baseline(d: Digits, model: str, version: str, student: Predictor) -> Iterator[bytes]:
    """The PSI reference: the student's predictions on every clean image, as JSONL lines."""
    log_s = student(d.x)
    for i in range(len(d.x)):
        yield orjson.dumps({"request_id": f"ref-{i}", "model": model, "student_version": version, "ts": 1_795_000_000_000,
                            "features": {name: round(float(v), 4) for name, v in zip(FEATURES, d.x[i], strict=True)},
                            "logits": _logits(log_s[i])})
