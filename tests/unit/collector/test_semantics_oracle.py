"""JSONL, Parquet and an independent model of the README's rules agree on random streams.

Streams mix two models with different class counts (one of them changing its own), duplicate request ids (predictions, replays and
labels), out-of-order event times, replays and labels from before their prediction to far past the
grace (late and unmatched), orphans, predictions carrying their label and audit records. The Kafka
path is held to `kdwatch analyze` by tests/integration/test_live_equivalence.py; this holds
`analyze` to the rules themselves (tests/oracle.py shares no code with the engine).
"""

from __future__ import annotations

import random
import zlib
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdwatch.analyzer.window import WindowState
from kdwatch.collector.offline import analyze_files
from kdwatch.collector.parquet_io import convert_jsonl
from kdwatch.collector.records import WindowKey
from tests.oracle import INPUTS, Oracle
from tests.record_joiner.offline import record_analyze

WINDOW_MS, GRACE_MS = 10_000, 20_000
T0 = 1_795_000_000_000
CLASSES = {"m1": 3, "m2": 5}
COMPARED = ("n", "n_joined", "n_labeled", "n_late", "n_duplicate", "n_audit", "agreement", "accuracy_student")


def _probs(rng: random.Random, k: int) -> list[float]:
    weights = [rng.random() + 1e-3 for _ in range(k)]
    total = sum(weights)
    return [w / total for w in weights]


def _jumbled(events: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    """Roughly in event-time order, with neighbours swapped and a few stragglers: files and partitions are rarely sorted."""
    out = sorted(events, key=lambda e: e["ts"])
    for i in range(len(out) - 1):
        if rng.random() < 0.2:
            out[i], out[i + 1] = out[i + 1], out[i]
    for i in range(len(out)):
        if rng.random() < 0.04:  # a straggler: written far later than its event time (late, if past the grace)
            out.insert(min(len(out), i + rng.randint(50, 400)), out.pop(i))
    return out


def random_stream(seed: int, n: int, retries_only: bool = False) -> dict[str, list[dict[str, Any]]]:
    """``retries_only``: a request_id repeats only as a producer's retry (a copy soon after), never as a new request."""
    rng = random.Random(seed)
    ids = [f"r{i}" for i in range(int(n * 0.85))]  # fewer ids than predictions: some repeat
    predictions, teacher, labels = [], [], []
    for i in range(n):
        model = rng.choice(list(CLASSES))
        k = CLASSES[model] - (model == "m2" and rng.random() < 0.15)  # m2's class count changes now and then
        rid = f"r{i}" if retries_only else rng.choice(ids)
        ts = T0 + i * 150 + rng.randint(-3_000, 3_000)
        p: dict[str, Any] = {"request_id": rid, "model": model, "student_version": rng.choice(["s1", "s2"]), "ts": ts,
                             "probs": _probs(rng, k)}
        if rng.random() < 0.05:
            p["request_id"] = f"audit-{rid}"
            p["audit"] = rng.choice(["member", "nonmember"])
            p["label"] = rng.randrange(k)
        elif rng.random() < 0.1:
            p["label"] = rng.randrange(k)
        predictions.append(p)
        if retries_only and rng.random() < 0.05:
            p["_retry"] = True  # sent again just after it (below, once the file is jumbled)
        if "audit" in p:
            continue
        for _ in range(2 if rng.random() < 0.05 else 1):  # sometimes a second replay or label
            if rng.random() < 0.5:  # a few replays of another class count than their prediction (rejected)
                teacher.append({"request_id": rid, "model": model, "teacher_version": "t1",
                                "ts": ts + rng.randint(-2_000, 40_000), "probs": _probs(rng, k + (rng.random() < 0.04))})
            if rng.random() < 0.3:
                # A few labels name a class the student does not have (rejected when they would join).
                label = rng.randrange(k) if rng.random() < 0.95 else k + rng.randrange(2)
                labels.append({"request_id": rid, "model": model, "label": label, "ts": ts + rng.randint(0, 60_000)})
    for _ in range(n // 20):  # orphans: no prediction ever comes
        model = rng.choice(list(CLASSES))
        ts = T0 + rng.randint(0, n * 150)
        teacher.append({"request_id": f"orphan-{rng.random()}", "model": model, "teacher_version": "t1", "ts": ts,
                        "probs": _probs(rng, CLASSES[model])})
        labels.append({"request_id": f"orphan-{rng.random()}", "model": model, "label": 0, "ts": ts})
    sent: list[dict[str, Any]] = []
    for p in _jumbled(predictions, rng):
        sent.append(p)
        if p.pop("_retry", False):
            sent.append(dict(p, ts=p["ts"] + rng.randint(0, 2_000)))
    return {"prediction": sent, "teacher": _jumbled(teacher, rng), "label": _jumbled(labels, rng)}


def _write(stream: dict[str, list[dict[str, Any]]], directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind in INPUTS:
        paths[kind] = directory / f"{kind}.jsonl"
        paths[kind].write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in stream[kind]))
    return paths


def _fields(windows: dict[WindowKey, WindowState]) -> dict[tuple[str, str, int], dict[str, Any]]:
    out = {}
    for key, state in windows.items():
        result = state.result(None)
        out[tuple(key)] = {name: result[name] for name in COMPARED}
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31), n=st.integers(20, 400), retries_only=st.booleans())
def test_jsonl_parquet_and_the_oracle_agree_on_random_streams(tmp_path: Path, seed: int, n: int, retries_only: bool) -> None:
    """The record joiner (JSONL), the columnar engine (JSONL, Parquet) and the oracle agree (with retries only, or
    with request_ids also reused after their window closed)."""
    stream = random_stream(seed, n, retries_only)
    paths = _write(stream, tmp_path / f"s{seed}-{n}-{retries_only}")
    jsonl_windows, jsonl_counters = record_analyze(paths["prediction"], paths["teacher"], paths["label"],
                                                  window_ms=WINDOW_MS, grace_ms=GRACE_MS)
    parquet = {kind: path.with_suffix(".parquet") for kind, path in paths.items()}
    for kind in INPUTS:
        convert_jsonl(paths[kind], parquet[kind], kind)
    oracle = Oracle(WINDOW_MS, GRACE_MS)
    oracle.run(stream)
    expected = {key: w.fields() for key, w in oracle.windows.items()}
    counted = {k: v for k, v in oracle.counters.items() if v}
    assert _fields(jsonl_windows) == expected
    assert {k: v for k, v in jsonl_counters.items() if v} == counted
    for source in (paths, parquet):  # the columnar engine on both formats
        windows, counters = analyze_files(source["prediction"], source["teacher"], source["label"],
                                          window_ms=WINDOW_MS, grace_ms=GRACE_MS)
        assert _fields(windows) == expected
        assert {k: v for k, v in counters.items() if v} == counted


def test_the_random_streams_reach_every_outcome() -> None:
    """The generator is worth its salt: late, duplicate and unmatched records, joins and audits all occur."""
    oracle = Oracle(WINDOW_MS, GRACE_MS)
    oracle.run(random_stream(1, 400))
    reasons = {reason for (_kind, reason), count in oracle.counters.items() if count}
    assert {"valid", "late", "duplicate", "unmatched", "label_out_of_range", "class_count_mismatch"} <= reasons
    totals = {name: sum(w.fields()[name] for w in oracle.windows.values()) for name in ("n_joined", "n_labeled", "n_audit", "n_late")}
    assert all(totals.values()), totals


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31), partitions=st.integers(2, 5))
def test_partitions_run_on_the_engine_as_on_the_record_joiner(tmp_path: Path, seed: int, partitions: int) -> None:
    """`analyze --partitions N`: the files split by the request_id's partition, each co-partition on the engine,
    equal to the record joiner reading each partition's share of the files; JSONL and Parquet."""
    stream = random_stream(seed, 300)
    stream["prediction"].insert(7, {"request_id": 5, "model": "m1"})  # unreadable request_id: partition 0
    paths = _write(stream, tmp_path / f"p{seed}-{partitions}")
    parquet = {kind: path.with_suffix(".parquet") for kind, path in paths.items()}
    for kind in INPUTS:
        convert_jsonl(paths[kind], parquet[kind], kind)

    def partitioner(key: bytes, n: int) -> int:
        return zlib.crc32(key) % n

    for source in (paths, parquet):  # (Parquet: convert left the unreadable line out)
        expected = record_analyze(source["prediction"], source["teacher"], source["label"], window_ms=WINDOW_MS,
                                 grace_ms=GRACE_MS, partitions=partitions, partitioner=partitioner)
        windows, counters = analyze_files(source["prediction"], source["teacher"], source["label"], window_ms=WINDOW_MS,
                                          grace_ms=GRACE_MS, partitions=partitions, partitioner=partitioner)
        assert _fields(windows) == _fields(expected[0])
        assert {k: v for k, v in counters.items() if v} == {k: v for k, v in expected[1].items() if v}
