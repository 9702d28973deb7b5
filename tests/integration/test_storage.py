"""The SQL store on SQLite and PostgreSQL: migrations, fencing, round trips."""

from __future__ import annotations

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from analyzer.window import WindowState
from collector.contract import Distribution, Prediction
from collector.join import PartitionJoiner, WindowKey
from kdwatch.errors import StoreConflict
from storage.schema import metadata
from storage.sql import SqlStore

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
