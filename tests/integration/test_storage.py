"""The SQL store on SQLite and PostgreSQL: migrations, fencing, round trips."""

from __future__ import annotations

import time

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from kdwatch.analyzer.window import WindowState
from kdwatch.collector.contract import Distribution, Prediction
from kdwatch.collector.records import Changes, WindowKey
from kdwatch.errors import StoreConflict
from kdwatch.storage.schema import metadata
from kdwatch.storage.sql import SqlStore
from tests.record_joiner.join import PartitionJoiner

T0 = 1_795_000_020_000
ALL_READ = {"prediction": False, "teacher": False, "label": False}


def test_the_migrations_create_exactly_the_declared_schema(store: SqlStore) -> None:
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_a_batch_round_trips_and_a_stale_offset_is_fenced(store: SqlStore) -> None:
    joiner = PartitionJoiner(60_000, 600_000)
    joiner.add_prediction(Prediction("a", "m", "s1", T0, Distribution(np.array([0.9, 0.1]), None), latency_ms=5.0))
    changes = joiner.end_batch(ALL_READ)
    store.commit_batch("g", 0, 60_000, changes, {"preds": (None, 1)})

    snapshot = store.load_partition("g", 0, ["preds", "teacher"])
    assert snapshot.offsets == {"preds": 1}
    assert list(snapshot.windows) == [WindowKey("m", "s1", T0 - T0 % 60_000)]
    assert [(e.kind, e.request_id) for e in snapshot.entries] == [("p", "a")]

    # A consumer that still believes the offset is 0 (it lost the partition) must not write.
    with pytest.raises(StoreConflict):
        store.commit_batch("g", 0, 60_000, PartitionJoiner(60_000, 600_000).end_batch(ALL_READ), {"preds": (0, 5)})
    # Nor may a second consumer create the offsets row again.
    with pytest.raises(StoreConflict):
        store.commit_batch("g", 0, 60_000, PartitionJoiner(60_000, 600_000).end_batch(ALL_READ), {"preds": (None, 3)})
    assert store.load_partition("g", 0, ["preds"]).offsets == {"preds": 1}


def test_readers_merge_the_rows_of_all_partitions(store: SqlStore) -> None:
    key = WindowKey("m", "s1", 60_000 * 29_916_667)
    for partition, n in ((0, 3), (1, 4)):
        joiner = PartitionJoiner(60_000, 600_000)
        changes = joiner.end_batch(ALL_READ)
        state = WindowState(n=n)
        changes.closed[key] = state
        store.commit_batch("g", partition, 60_000, changes, {"preds": (None, n)})
    (state, final, window_ms), = store.windows().values()
    assert (state.n, final, window_ms) == (7, True, 60_000)


def test_the_transfer_set_round_trips_and_keeps_the_newest_rows_per_model(store: SqlStore) -> None:
    from kdwatch.collector.records import TransferRecord

    def record(model: str, i: int) -> TransferRecord:
        return TransferRecord(model, f"r{i}", T0 + i * 1_000, "s1", {"x": float(i), "c": "a"},
                              Distribution(np.array([0.25, 0.75]), np.log(np.array([0.25, 0.75]))),
                              Distribution(np.array([0.5, 0.5]), None), i % 2 if i % 3 else None)

    offset = 0
    for i in range(0, 12, 4):
        changes = PartitionJoiner(60_000, 600_000).end_batch(ALL_READ)
        changes.transfer = [record("m", j) for j in range(i, i + 4)] + [record("other", i)]
        store.commit_batch("g", 0, 60_000, changes, {"preds": (offset if i else None, i + 4)}, transfer_max=6)
        offset = i + 4
    kept = store.transfer_records("m")
    assert [r.request_id for r in kept] == [f"r{i}" for i in range(6, 12)]
    assert store.transfer_count("other") == 3
    r = kept[0]
    assert (r.ts_ms, r.features, r.label, r.student_version) == (T0 + 6_000, {"x": 6.0, "c": "a"}, None, "s1")
    assert r.teacher.probs.tolist() == [0.25, 0.75] and r.teacher.log_probs is not None
    assert r.student.log_probs is None
    assert [x.request_id for x in store.transfer_records("m", T0 + 8_000, T0 + 10_000)] == ["r8", "r9"]


def test_the_change_signature_moves_with_every_window_write_and_reference(store: SqlStore) -> None:
    from kdwatch.analyzer.drift import ReferenceBuilder

    key = WindowKey("m", "s1", 60_000 * 29_916_667)
    first = store.change_signature("m")
    assert first == (0, 0, 0, None)
    seen = [first]
    for partition, offsets in ((0, (None, 1)), (1, (None, 1)), (0, (1, 2))):
        time.sleep(0.002)  # a row's writes are milliseconds apart in real use (one writer, a transaction each)
        changes = PartitionJoiner(60_000, 600_000).end_batch(ALL_READ)
        changes.windows[key] = WindowState(n=partition + 1)
        store.commit_batch("g", partition, 60_000, changes, {"preds": offsets})
        seen.append(store.change_signature("m"))
    assert len(set(seen)) == len(seen)  # every write changed it, even a rewrite of an existing row
    assert store.change_signature("m") == seen[-1]  # and nothing else does
    builder = ReferenceBuilder()
    builder.add("x", 1.0)
    store.put_reference("m", builder.build())
    assert store.change_signature("m")[3] is not None
    assert store.change_signature("other") == (0, 0, 0, None)


def test_readers_neither_wait_for_nor_block_a_writer(store: SqlStore) -> None:
    """A reader reads its snapshot while a write transaction is open, and a writer commits while a read is open."""
    from sqlalchemy import text

    from kdwatch.storage.sql import read_connection

    store.commit_batch("g", 0, 60_000, _one_window_changes(), {})
    with store.engine.begin() as writer:  # holds the write lock (BEGIN IMMEDIATE on SQLite)
        writer.execute(text("UPDATE window_state SET updated_at = updated_at + 1"))
        started = time.monotonic()
        assert len(store.windows(model="m")) == 1  # does not wait for the writer
        assert time.monotonic() - started < 1.0
    with read_connection(store.engine) as reader:
        reader.execute(text("SELECT count(*) FROM window_state")).one()  # a read transaction stays open
        started = time.monotonic()
        store.commit_batch("g", 1, 60_000, _one_window_changes(), {})
        assert time.monotonic() - started < 1.0


def _one_window_changes() -> Changes:
    changes = Changes()
    changes.closed[WindowKey("m", "s1", T0 - T0 % 60_000)] = WindowState(n=3)
    return changes


def test_window_versions_move_with_every_write_and_windows_of_merges_their_rows(store: SqlStore) -> None:
    base = 60_000 * 29_916_667
    first, second = WindowKey("m", "s1", base), WindowKey("m", "s1", base + 60_000)
    for partition, key in ((0, first), (1, first), (0, second)):
        changes = Changes()
        changes.closed[key] = WindowState(n=partition + 1)
        store.commit_batch("g", partition, 60_000, changes, {f"preds-{partition}-{key.window_start}": (None, 1)})
    versions = store.window_versions_since(0)
    assert {k: rows for k, (rows, _u) in versions.items()} == {first: 2, second: 1}
    newest = max(u for _r, u in versions.values())
    assert store.window_versions_since(newest) == {}
    assert {k: s.n for k, (s, _f, _w) in store.windows_of([first, second]).items()} == {first: 3, second: 1}
    time.sleep(0.01)
    changes = Changes()
    changes.closed[first] = WindowState(n=10)  # a later write to one partition's row of the first window
    store.commit_batch("g", 1, 60_000, changes, {"preds-late": (None, 1)})
    later = store.window_versions_since(newest)
    assert list(later) == [first] and later[first][1] > newest
    assert store.windows_of(later)[first][0].n == 11  # both partitions' rows, merged
