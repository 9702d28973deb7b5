"""The Kafka collector's columnar engine (collector.live_columns) fed as a consumer would feed it.

Records arrive in polls of random sizes, the three inputs fetched in random interleavings, and the
unit is restarted from its stored state (the blobs and scalars its commits wrote) at random moments,
re-reading from the committed offsets. Its closed windows, counters and dead letters must equal the
record joiner (`kdwatch analyze` with ``columnar=False``) on the same events: the result cannot
depend on fetch timing or restarts.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import pytest

from kdwatch.analyzer.window import WindowState
from kdwatch.collector.ingest import ingest, merge_key
from kdwatch.collector.join import PartitionJoiner
from kdwatch.collector.live_columns import ColumnarUnit
from kdwatch.collector.merge import EventTimeMerge
from kdwatch.collector.offline import analyze_files
from kdwatch.collector.records import Changes, EngineDelta, Source, WindowKey
from tests.unit.collector.test_columnar import assert_same
from tests.unit.collector.test_semantics_oracle import GRACE_MS, INPUTS, WINDOW_MS, _fields, _write, random_stream

TOPICS = {"prediction": "p", "teacher": "t", "label": "l"}


class Rec(NamedTuple):
    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes


class FakeStore:
    """What SqlStore keeps of the engine: its scalars and blobs, written per commit."""

    def __init__(self) -> None:
        self.meta: dict[str, Any] | None = None
        self.blobs: dict[tuple[str, str, int], tuple[int, bytes]] = {}
        self.offsets = dict.fromkeys(INPUTS, 0)

    def commit(self, delta: EngineDelta, moved: dict[str, int]) -> None:
        self.meta = orjson.loads(orjson.dumps(delta.meta))
        for kind, model, seq in delta.delete:
            for key in [k for k in self.blobs if k[0] == kind and k[2] == seq and (not model or k[1] == model)]:
                del self.blobs[key]
        if delta.purge_through is not None:
            for key in [k for k, (last, _b) in self.blobs.items()
                        if k[0].startswith("join_") and last <= delta.purge_through]:
                del self.blobs[key]
        for kind, model, seq, last, blob in delta.put:
            self.blobs[(kind, model, seq)] = (last, blob)
        for kind, topic in TOPICS.items():
            if topic in moved:
                self.offsets[kind] = moved[topic]


def _unit(store: FakeStore) -> ColumnarUnit:
    unit = ColumnarUnit(0, WINDOW_MS, GRACE_MS, {}, TOPICS, 0.0, max_future_ms=None)
    unit.restore(store.meta, sorted(((k, m, s, b) for (k, m, s), (_l, b) in store.blobs.items()), key=lambda r: r[2]))
    return unit


def run_live(stream: dict[str, list[dict[str, Any]]], seed: int, restarts: int, poison: bool = False
             ) -> tuple[dict[WindowKey, WindowState], Counter[tuple[str, str]], Counter[tuple[str, str]]]:
    rng = random.Random(seed)
    records = {kind: [Rec(TOPICS[kind], 0, i, 1, None, orjson.dumps(e)) for i, e in enumerate(stream[kind])] for kind in INPUTS}
    if poison:
        records["prediction"].insert(len(records["prediction"]) // 2, Rec("p", 0, 0, 1, None, b"{not json"))
        records["teacher"].insert(3, Rec("t", 0, 0, 1, None, b'{"request_id": 5}'))
        records = {kind: [r._replace(offset=i) for i, r in enumerate(rs)] for kind, rs in records.items()}
    store = FakeStore()
    unit = _unit(store)
    fetched = dict(store.offsets)
    windows: dict[WindowKey, WindowState] = {}
    counters: Counter[tuple[str, str]] = Counter()
    letters: Counter[tuple[str, str]] = Counter()
    crash_at = sorted(rng.sample(range(1, 400), restarts))
    polls = 0
    while True:
        polls += 1
        if crash_at and polls == crash_at[0]:
            crash_at.pop(0)
            unit = _unit(store)  # what was not committed is gone; read again from the stored offsets
            fetched = dict(store.offsets)
        for kind in rng.sample(INPUTS, rng.randint(1, 3)):
            n = rng.choice([1, 3, 17, 60, 250])
            batch = records[kind][fetched[kind]:fetched[kind] + n]
            unit.push(kind, batch)
            fetched[kind] += len(batch)
        for kind in INPUTS:
            unit.queues.set_at_end(kind, fetched[kind] >= len(records[kind]))
        changes, moved = unit.step()
        _collect(changes, windows, counters, letters)
        assert changes.engine is not None
        store.commit(changes.engine, moved)
        done = all(store.offsets[k] >= len(records[k]) for k in INPUTS)
        if done and not crash_at:
            break
    # Every input at its end and idle: close what is still open, as the offline path does at the end of its files.
    unit.analyzer.advance(close_all=True)
    rest = Changes()
    unit._harvest(rest, {})
    _collect(rest, windows, counters, letters)
    return windows, counters, letters


def _collect(changes: Changes, windows: dict[WindowKey, WindowState], counters: Counter[tuple[str, str]],
             letters: Counter[tuple[str, str]]) -> None:
    for key, state in changes.closed.items():
        assert key not in windows, f"window {key} closed twice"
        windows[key] = state
    for key, count in changes.late.items():
        windows.setdefault(key, WindowState()).n_late += count
    counters.update(changes.counters)
    letters.update((TOPIC_KIND[dl.source.topic], dl.reason) for dl in changes.dead_letters)


TOPIC_KIND = {topic: kind for kind, topic in TOPICS.items()}


@pytest.mark.parametrize("seed", range(6))
def test_live_engine_equals_analyze_whatever_the_fetch_timing_and_restarts(tmp_path: Path, seed: int) -> None:
    stream = random_stream(seed, 300, retries_only=True)
    paths = _write(stream, tmp_path)
    expected_windows, expected_counters = analyze_files(paths["prediction"], paths["teacher"], paths["label"],
                                                        window_ms=WINDOW_MS, grace_ms=GRACE_MS, columnar=False)
    for restarts in (0, 3):
        windows, counters, letters = run_live(stream, seed * 10 + restarts, restarts)
        assert _fields(windows) == _fields(expected_windows)
        for key, state in expected_windows.items():
            assert_same(windows[key].result(None), state.result(None), str(key))
        assert {k: v for k, v in counters.items() if v} == {k: v for k, v in expected_counters.items() if v}
        # Every record that is not valid-and-kept reaches the dead-letter topic once, with its reason.
        assert letters == Counter({k: v for k, v in counters.items() if k[1] != "valid" and v})


def test_poison_records_are_dead_lettered_with_their_reason(tmp_path: Path) -> None:
    stream = random_stream(3, 120, retries_only=True)
    windows, counters, letters = run_live(stream, 1, 2, poison=True)
    assert letters[("prediction", "invalid_json")] == 1
    assert letters[("teacher", "missing_field")] + letters[("teacher", "wrong_type")] == 1
    assert counters[("prediction", "invalid_json")] == 1
    clean, _c, _l = run_live(stream, 1, 0)
    assert _fields(windows) == _fields(clean)  # poison changes nothing else


def run_handover(stream: dict[str, list[dict[str, Any]]], seed: int, at_poll: int
                 ) -> tuple[dict[WindowKey, WindowState], Counter[tuple[str, str]], Counter[tuple[str, str]]]:
    """The columnar engine for ``at_poll`` polls, then the record joiner from the stored state (a hand-over)."""
    rng = random.Random(seed)
    records = {kind: [Rec(TOPICS[kind], 0, i, 1, None, orjson.dumps(e)) for i, e in enumerate(stream[kind])] for kind in INPUTS}
    store = FakeStore()
    unit = _unit(store)
    fetched = dict(store.offsets)
    windows: dict[WindowKey, WindowState] = {}
    counters: Counter[tuple[str, str]] = Counter()
    letters: Counter[tuple[str, str]] = Counter()
    for _ in range(at_poll):
        for kind in rng.sample(INPUTS, rng.randint(1, 3)):
            batch = records[kind][fetched[kind]:fetched[kind] + rng.choice([1, 5, 40])]
            unit.push(kind, batch)
            fetched[kind] += len(batch)
        for kind in INPUTS:
            unit.queues.set_at_end(kind, fetched[kind] >= len(records[kind]))
        changes, moved = unit.step()
        _collect(changes, windows, counters, letters)
        assert changes.engine is not None
        store.commit(changes.engine, moved)
    snapshot = _unit(store).record_state()
    joiner = PartitionJoiner(WINDOW_MS, GRACE_MS, {}, watermark=snapshot.watermark, observed=snapshot.observed,
                             windows=snapshot.windows, entries=snapshot.entries)
    merge: EventTimeMerge[tuple[Source, Any]] = EventTimeMerge(0.0)
    for kind in INPUTS:
        for r in records[kind][store.offsets[kind]:]:
            key, parsed = merge_key(r.value)
            merge.push(kind, key, (Source(r.topic, 0, r.offset, r.timestamp, r.key, r.value), parsed))
        merge.set_at_end(kind, True)
    joiner.advance_watermark(merge.idle())
    while (item := merge.next()) is not None:
        kind, (source, parsed) = item
        ingest(joiner, kind, source.value, source, parsed=parsed)
        joiner.advance_watermark(merge.idle())
    _collect(joiner.end_batch(merge.idle(), close_all=True), windows, counters, letters)
    return windows, counters, letters


@pytest.mark.parametrize("seed", range(4))
def test_a_hand_over_to_the_record_joiner_changes_nothing(tmp_path: Path, seed: int) -> None:
    """Data the columnar engine cannot take yet (a generative student) goes on on the record joiner from its state."""
    stream = random_stream(seed, 300, retries_only=True)
    paths = _write(stream, tmp_path)
    expected_windows, expected_counters = analyze_files(paths["prediction"], paths["teacher"], paths["label"],
                                                        window_ms=WINDOW_MS, grace_ms=GRACE_MS, columnar=False)
    for at_poll in (3, 25, 60):
        windows, counters, letters = run_handover(stream, seed + at_poll, at_poll)
        assert _fields(windows) == _fields(expected_windows)
        for key, state in expected_windows.items():
            assert_same(windows[key].result(None), state.result(None), str(key))
        assert {k: v for k, v in counters.items() if v} == {k: v for k, v in expected_counters.items() if v}
        assert letters == Counter({k: v for k, v in counters.items() if k[1] != "valid" and v})
