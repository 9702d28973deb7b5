"""The Kafka collector's columnar engine (collector.live_columns) fed as a consumer would feed it.

Records arrive in polls of random sizes, the three inputs fetched in random interleavings, and the
unit is restarted from its stored state (the blobs and scalars its commits wrote) at random moments,
re-reading from the committed offsets. Its closed windows, counters and dead letters must equal the
record joiner (tests/record_joiner) on the same events: the result cannot
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
from kdwatch.collector.live_columns import ColumnarUnit
from kdwatch.collector.records import Changes, EngineDelta, WindowKey
from tests.record_joiner.offline import record_analyze
from tests.unit.collector.test_columnar import assert_same
from tests.unit.collector.test_generative_engine import _stream as generative_stream
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


class Feed:
    """A consumer's view: records fetched in polls, each step committed to the store, outcomes gathered."""

    def __init__(self, records: dict[str, list[Rec]]) -> None:
        self.records = records
        self.store = FakeStore()
        self.restart()
        self.windows: dict[WindowKey, WindowState] = {}
        self.counters: Counter[tuple[str, str]] = Counter()
        self.letters: Counter[tuple[str, str]] = Counter()

    def restart(self) -> None:
        """What was not committed is gone; read again from the stored offsets."""
        self.unit = _unit(self.store)
        self.fetched = dict(self.store.offsets)

    def poll(self, rng: random.Random, sizes: list[int]) -> None:
        for kind in rng.sample(INPUTS, rng.randint(1, 3)):
            batch = self.records[kind][self.fetched[kind]:self.fetched[kind] + rng.choice(sizes)]
            self.unit.push(kind, batch)
            self.fetched[kind] += len(batch)
        for kind in INPUTS:
            self.unit.queues.set_at_end(kind, self.fetched[kind] >= len(self.records[kind]))
        changes, moved = self.unit.step()
        _collect(changes, self.windows, self.counters, self.letters)
        assert changes.engine is not None
        self.store.commit(changes.engine, moved)

    def done(self) -> bool:
        return all(self.store.offsets[k] >= len(self.records[k]) for k in INPUTS)


def _records(stream: dict[str, list[dict[str, Any]]]) -> dict[str, list[Rec]]:
    return {kind: [Rec(TOPICS[kind], 0, i, 1, None, orjson.dumps(e)) for i, e in enumerate(stream[kind])] for kind in INPUTS}


def run_live(stream: dict[str, list[dict[str, Any]]], seed: int, restarts: int, poison: bool = False
             ) -> tuple[dict[WindowKey, WindowState], Counter[tuple[str, str]], Counter[tuple[str, str]]]:
    rng = random.Random(seed)
    records = _records(stream)
    if poison:
        records["prediction"].insert(len(records["prediction"]) // 2, Rec("p", 0, 0, 1, None, b"{not json"))
        records["teacher"].insert(3, Rec("t", 0, 0, 1, None, b'{"request_id": 5}'))
        records = {kind: [r._replace(offset=i) for i, r in enumerate(rs)] for kind, rs in records.items()}
    feed = Feed(records)
    crash_at = sorted(rng.sample(range(1, 400), restarts))
    polls = 0
    while not (feed.done() and not crash_at):
        polls += 1
        if crash_at and polls == crash_at[0]:
            crash_at.pop(0)
            feed.restart()
        feed.poll(rng, [1, 3, 17, 60, 250])
    # Every input at its end and idle: close what is still open, as the offline path does at the end of its files.
    feed.unit.analyzer.advance(close_all=True)
    rest = Changes()
    feed.unit._harvest(rest, {})
    _collect(rest, feed.windows, feed.counters, feed.letters)
    return feed.windows, feed.counters, feed.letters


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
    expected = _analyze(stream, tmp_path)
    for restarts in (0, 3):
        assert_as_analyze(*run_live(stream, seed * 10 + restarts, restarts), expected)


def _analyze(stream: dict[str, list[dict[str, Any]]], tmp_path: Path) -> tuple[dict[WindowKey, WindowState], dict[tuple[str, str], int]]:
    paths = _write(stream, tmp_path)
    return record_analyze(paths["prediction"], paths["teacher"], paths["label"], window_ms=WINDOW_MS, grace_ms=GRACE_MS)


def assert_as_analyze(windows: dict[WindowKey, WindowState], counters: Counter[tuple[str, str]], letters: Counter[tuple[str, str]],
                      expected: tuple[dict[WindowKey, WindowState], dict[tuple[str, str], int]]) -> None:
    expected_windows, expected_counters = expected
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


@pytest.mark.parametrize("seed", range(3))
def test_generative_students_stay_on_the_live_engine_through_restarts(tmp_path: Path, seed: int) -> None:
    """A generative student, a classifier and a model whose windows get both kinds, with invalid generations, length
    and kind mismatches and duplicates: the live engine (random polls, restarts from the stored blobs) equals analyze."""
    stream = generative_stream(seed, 1_000)
    for kind in INPUTS:  # some records twice, a few positions later (at-least-once producers)
        rows = stream[kind]
        for i in range(0, len(rows), 37):
            rows.insert(min(i + 5, len(rows)), rows[i])
    expected = _analyze(stream, tmp_path)
    assert expected[1].get(("teacher", "generation_length_mismatch"), 0) > 0
    for restarts in (0, 40):  # restarts at random polls of the first 400: many while records still flow
        assert_as_analyze(*run_live(stream, seed * 10 + restarts, restarts), expected)
