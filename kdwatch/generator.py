"""A generator of realistic contract-v1 traffic for demos, tests and benchmarks.

A teacher has a latent class per request; the student agrees with it most of the time, with
softmax outputs whose sharpness varies. A fraction of requests is replayed against the teacher and
a fraction gets a delayed label. Events come out in arrival order: each replay a little after its
prediction, each label later still (but within the default grace). Deterministic for a seed.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import orjson


@dataclass(frozen=True)
class TrafficSpec:
    model: str = "fraud-distil"
    student_version: str = "s1"
    teacher_version: str = "t1"
    n_classes: int = 10
    n_features: int = 10
    start_ms: int = 1_795_000_000_000  # 2026-11-18T11:06:40Z
    events_per_second: float = 50.0
    teacher_rate: float = 0.10
    label_rate: float = 0.10
    # Share of requests where the student is pushed to a random class (an incident raises it).
    disagreement: float = 0.0
    feature_shift: float = 0.0
    logits: bool = False
    # Share of predictions followed by an audit replay of a training member or a held-out record;
    # the student is a little more confident on members, as an overfit student would be.
    audit_rate: float = 0.0
    seed: int = 0


class ArrivalQueue:
    """Records due later (replays, labels) released in due-time order; ties keep insertion order."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, str, str, bytes]] = []
        self._seq = 0

    def push(self, due_ms: int, kind: str, request_id: str, value: bytes) -> None:
        heapq.heappush(self._heap, (due_ms, self._seq, kind, request_id, value))
        self._seq += 1

    def due(self, now_ms: int) -> Iterator[tuple[str, str, bytes]]:
        """Pop every record due at or before ``now_ms``."""
        while self._heap and self._heap[0][0] <= now_ms:
            _due, _s, kind, request_id, value = heapq.heappop(self._heap)
            yield kind, request_id, value

    def drain(self) -> Iterator[tuple[str, str, bytes]]:
        for _due, _s, kind, request_id, value in sorted(self._heap):
            yield kind, request_id, value
        self._heap.clear()


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def generate(spec: TrafficSpec, n: int) -> Iterator[tuple[str, str, bytes]]:
    """(kind, request_id, value) for ``n`` predictions with their replays and labels, in arrival order."""
    rng = np.random.default_rng(spec.seed)
    k = spec.n_classes
    step_ms = 1000.0 / spec.events_per_second
    pending = ArrivalQueue()
    for i in range(n):
        ts = spec.start_ms + int(i * step_ms)
        rid = f"{spec.model}-{spec.seed}-{i}"
        true_class = int(rng.integers(k))
        teacher_logits = rng.normal(0, 1, k)
        teacher_logits[true_class] += 4.0
        student_logits = teacher_logits * rng.uniform(0.8, 1.2) + rng.normal(0, 0.15, k)
        if rng.random() < spec.disagreement:
            student_logits[int(rng.integers(k))] += 6.0
        features = {f"f{j}": round(float(rng.normal(j * 0.1 + spec.feature_shift, 1.0)), 6) for j in range(spec.n_features)}
        prediction: dict[str, object] = {
            "request_id": rid, "model": spec.model, "student_version": spec.student_version, "ts": ts,
            "latency_ms": round(float(rng.lognormal(2.5, 0.4)), 3), "features": features,
            "segment": ("eu", "us", "apac")[i % 3],
        }
        if spec.logits:
            prediction["logits"] = [round(float(x), 6) for x in student_logits]
        else:
            prediction["probs"] = [float(x) for x in _softmax(student_logits)]
        yield "prediction", rid, orjson.dumps(prediction)
        if spec.audit_rate and rng.random() < spec.audit_rate:
            member = bool(rng.random() < 0.5)
            audit_logits = teacher_logits + rng.normal(0, 1.0, k)
            audit_logits[true_class] += 1.5 if member else 0.0
            audit = {"request_id": f"audit-{rid}", "model": spec.model, "student_version": spec.student_version,
                     "ts": ts, "probs": [float(x) for x in _softmax(audit_logits)], "label": true_class,
                     "audit": "member" if member else "nonmember"}
            yield "prediction", f"audit-{rid}", orjson.dumps(audit)
        label = int(np.argmax(teacher_logits)) if rng.random() < 0.9 else int(rng.integers(k))
        if rng.random() < spec.teacher_rate:
            teacher = {"request_id": rid, "model": spec.model, "teacher_version": spec.teacher_version,
                       "ts": ts + 2_000}
            if spec.logits:
                teacher["logits"] = [round(float(x), 6) for x in teacher_logits]
            else:
                teacher["probs"] = [float(x) for x in _softmax(teacher_logits)]
            pending.push(ts + 2_000, "teacher", rid, orjson.dumps(teacher))
        if rng.random() < spec.label_rate:
            delay = int(rng.uniform(10_000, 120_000))
            pending.push(ts + delay, "label", rid,
                         orjson.dumps({"request_id": rid, "model": spec.model, "label": label, "ts": ts + delay}))
        yield from pending.due(ts)
    yield from pending.drain()


@dataclass(frozen=True)
class GenerativeSpec:
    """Traffic of a generative (language-model) student: token sequences, teacher-forced replays."""

    model: str = "support-chat"
    student_version: str = "s1"
    teacher_version: str = "t1"
    vocab: int = 32_000
    mean_length: float = 64.0
    start_ms: int = 1_795_000_000_000
    events_per_second: float = 20.0
    teacher_rate: float = 0.25
    # Share of positions where the teacher prefers another token (a shift in the prompts raises it).
    disagreement: float = 0.03
    audit_rate: float = 0.0
    seed: int = 0


def generate_generative(spec: GenerativeSpec, n: int) -> Iterator[tuple[str, str, bytes]]:
    """(kind, request_id, value) for ``n`` generative predictions and their teacher replays, in arrival order."""
    rng = np.random.default_rng(spec.seed)
    step_ms = 1000.0 / spec.events_per_second
    pending = ArrivalQueue()
    for i in range(n):
        ts = spec.start_ms + int(i * step_ms)
        rid = f"{spec.model}-{spec.seed}-{i}"
        length = int(min(max(rng.poisson(spec.mean_length), 1), 4096))
        tokens = rng.integers(0, spec.vocab, length)
        student = -rng.exponential(0.6, length)
        prediction = {"request_id": rid, "model": spec.model, "student_version": spec.student_version, "ts": ts,
                      "latency_ms": round(float(rng.lognormal(4.0, 0.3)), 3),
                      "features": {"prompt_tokens": int(rng.integers(8, 512)), "channel": ("web", "app")[i % 2]},
                      "generation": {"tokens": tokens.tolist(), "logprobs": [round(float(x), 6) for x in student]}}
        yield "prediction", rid, orjson.dumps(prediction)
        if spec.audit_rate and rng.random() < spec.audit_rate:
            member = bool(rng.random() < 0.5)
            audit_lp = -rng.exponential(0.45 if member else 0.6, length)
            audit = {"request_id": f"audit-{rid}", "model": spec.model, "student_version": spec.student_version, "ts": ts,
                     "audit": "member" if member else "nonmember",
                     "generation": {"tokens": tokens.tolist(), "logprobs": [round(float(x), 6) for x in audit_lp]}}
            yield "prediction", f"audit-{rid}", orjson.dumps(audit)
        if rng.random() < spec.teacher_rate:
            differ = rng.random(length) < spec.disagreement
            top1 = np.where(differ, (tokens + 1 + rng.integers(0, spec.vocab - 1, length)) % spec.vocab, tokens)
            teacher_lp = np.minimum(student + rng.normal(0.05, 0.3, length) - np.where(differ, 1.5, 0.0), 0.0)
            teacher = {"request_id": rid, "model": spec.model, "teacher_version": spec.teacher_version, "ts": ts + 2_000,
                       "generation": {"logprobs": [round(float(x), 6) for x in teacher_lp], "top1": top1.tolist()}}
            pending.push(ts + 2_000, "teacher", rid, orjson.dumps(teacher))
        yield from pending.due(ts)
    yield from pending.drain()
