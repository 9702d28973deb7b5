"""The replayer's pure parts: deterministic sampling, the token bucket, retries and dead letters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import pytest

from kdwatch.collector.contract import decode_teacher
from kdwatch.collector.replayer import Replayer, ReplayerConfig, TokenBucket, sampled
from kdwatch.collector.teachers import TeacherError, TeacherOutput


def test_sampling_is_deterministic_per_request_and_close_to_the_rate() -> None:
    ids = [f"req-{i}" for i in range(20_000)]
    first = [sampled("m", rid, 0.3) for rid in ids]
    assert first == [sampled("m", rid, 0.3) for rid in ids]  # a re-run samples the same requests
    assert 0.28 < sum(first) / len(ids) < 0.32
    assert all(sampled("m", rid, 0.5) for rid, s in zip(ids, first, strict=True) if s)  # a higher rate keeps them
    assert not any(sampled("m", rid, 0.0) for rid in ids) and all(sampled("m", rid, 1.0) for rid in ids)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_the_token_bucket_caps_the_rate_after_the_initial_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10.0, burst=10.0, clock=clock, sleep=clock.sleep)
    for _ in range(10):
        assert bucket.acquire() == 0.0  # the burst
    for _ in range(50):
        bucket.acquire()
    assert clock.now == pytest.approx(5.0)  # 50 more at 10 per second
    assert bucket.acquire(25) > 0  # a batch larger than the bucket waits for a full bucket, then goes
    assert clock.now == pytest.approx(6.0)


class ScriptedTeacher:
    """A teacher whose calls fail ``failures`` times, and which cannot answer rows with x < 0."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls = 0

    def predict(self, rows: Sequence[Mapping[str, Any]]) -> list[TeacherOutput]:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise TeacherError("HTTP 503")
        if any(float(r["x"]) < 0 for r in rows):
            raise TeacherError("cannot score a negative x")
        return [TeacherOutput([float(r["x"]), 0.0], "logits") for r in rows]


def _chosen(*xs: float) -> list[tuple[Any, dict[str, Any]]]:
    return [(f"src{i}", {"request_id": f"r{i}", "model": "m", "ts": 1_795_000_000_000 + i, "features": {"x": x}})
            for i, x in enumerate(xs)]


def test_a_transient_teacher_failure_is_retried_with_backoff() -> None:
    clock = FakeClock()
    teacher = ScriptedTeacher(failures=2)
    replayer = Replayer(ReplayerConfig("unused", teacher_version="t9", retries=3, backoff_s=0.1), teacher, sleep=clock.sleep)
    replays, failures = replayer.replay(_chosen(1.0, 2.0))
    assert failures == [] and teacher.calls == 3 and clock.slept == pytest.approx([0.1, 0.2])
    decoded = [decode_teacher(value) for _key, value in replays]
    assert [(t.request_id, t.teacher_version, t.ts_ms) for t in decoded] == [("r0", "t9", 1_795_000_000_000),
                                                                             ("r1", "t9", 1_795_000_000_001)]
    assert orjson.loads(replays[0][1])["logits"] == [1.0, 0.0]


def test_records_that_fail_alone_are_dead_lettered_and_the_rest_replayed() -> None:
    clock = FakeClock()
    replayer = Replayer(ReplayerConfig("unused", retries=1), ScriptedTeacher(), sleep=clock.sleep)
    replays, failures = replayer.replay(_chosen(1.0, -1.0, 3.0))
    assert [key for key, _v in replays] == ["r0", "r2"]
    assert failures == [("src1", "teacher_error", "cannot score a negative x")]


def test_a_teacher_answer_that_breaks_the_contract_is_dead_lettered() -> None:
    class Unnormalised:
        def predict(self, rows: Sequence[Mapping[str, Any]]) -> list[TeacherOutput]:
            return [TeacherOutput([0.9, 0.9], "probs") for _ in rows]

    replays, failures = Replayer(ReplayerConfig("unused"), Unnormalised()).replay(_chosen(1.0))
    assert replays == [] and failures[0][1] == "invalid_teacher_output" and "probs_not_normalised" in failures[0][2]


def test_invalid_audit_and_featureless_predictions_are_skipped() -> None:
    replayer = Replayer(ReplayerConfig("unused", sample_rate=1.0), ScriptedTeacher())
    base = {"request_id": "r", "model": "m", "student_version": "s", "ts": 1_795_000_000_000, "probs": [0.5, 0.5]}
    assert replayer.select(b"{broken") is None
    assert replayer.select(orjson.dumps({**base, "label": 0, "audit": "member", "features": {"x": 1.0}})) is None
    assert replayer.select(orjson.dumps(base)) is None
    chosen = replayer.select(orjson.dumps({**base, "features": {"x": 1.0}}))
    assert chosen == {"request_id": "r", "model": "m", "ts": 1_795_000_000_000, "features": {"x": 1.0}}
    off = Replayer(ReplayerConfig("unused", sample_rate=1.0, model_rates={"m": 0.0}), ScriptedTeacher())
    assert off.select(orjson.dumps({**base, "features": {"x": 1.0}})) is None
