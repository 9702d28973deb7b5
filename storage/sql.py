"""The SQL window store (SQLite by default, PostgreSQL by URL) behind one narrow interface.

Exactly-once effect: a collector batch (its window states, join-buffer changes, counters, watermark
and the offsets it consumed) commits in one transaction. Offsets are compare-and-set: if another
consumer advanced them since we loaded them, the transaction fails with :class:`StoreConflict`
and nothing of the batch is kept.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, Select, and_, bindparam, create_engine, delete, event, func, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, OperationalError

from kdwatch.analyzer.drift import Reference
from kdwatch.analyzer.window import WindowState
from kdwatch.collector.records import (
    Changes,
    EngineDelta,
    PartitionSnapshot,
    TransferRecord,
    WindowKey,
    entry_from_dict,
    entry_to_dict,
    transfer_from_row,
    transfer_to_dict,
)
from kdwatch.errors import StoreConflict, StoreUnavailable
from kdwatch.storage.schema import (
    consumer_offsets,
    engine_blobs,
    engine_meta,
    event_counters,
    join_entries,
    partition_watermarks,
    references,
    transfer_set,
    window_state,
)

MIGRATIONS = Path(__file__).parent / "migrations"


def _now_ms() -> int:
    return int(time.time() * 1000)


def create_db_engine(url: str) -> Engine:
    """An engine with SQLite set up for several processes (WAL, busy timeout, BEGIN IMMEDIATE)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_setup(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a process crash (kill -9); only power loss can drop the tail.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            # IMMEDIATE takes the write lock up front: no deadlock on a read-then-write upgrade. A read-only
            # connection (read_connection) takes no lock: in WAL mode it reads its snapshot while a writer
            # commits, so the API and other readers neither wait for nor hold up a collector.
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


READ_ONLY = "kdwatch_read_only"


def read_connection(engine: Engine) -> Connection:
    """A connection for reads only (its transaction is rolled back, never written)."""
    return engine.connect().execution_options(**{READ_ONLY: True})


def _window_filter(query: Select[Any], model: str | None, student_version: str | None, start_ms: int | None,
                   end_ms: int | None) -> Select[Any]:
    """Restrict a window_state query to a model, a version and [start, end) of window starts."""
    if model is not None:
        query = query.where(window_state.c.model == model)
    if student_version is not None:
        query = query.where(window_state.c.student_version == student_version)
    if start_ms is not None:
        query = query.where(window_state.c.window_start >= start_ms)
    if end_ms is not None:
        query = query.where(window_state.c.window_start < end_ms)
    return query


def _merge_rows(rows: Iterable[Any], merged: dict[WindowKey, tuple[WindowState, bool, int]]) -> None:
    """Fold window_state rows into ``merged``: one state per window over its partitions, final when every row is closed."""
    for r in rows:
        key = WindowKey(r.model, r.student_version, r.window_start)
        state = WindowState.from_dict(orjson.loads(r.state))
        if key in merged:
            prior, final, window_ms = merged[key]
            merged[key] = (prior.merge(state), final and r.closed, window_ms)
        else:
            merged[key] = (state, bool(r.closed), r.window_ms)


class SqlStore:
    """Window state, join buffer, offsets and counters in one SQL database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert

    @classmethod
    def from_url(cls, url: str) -> SqlStore:
        return cls(create_db_engine(url))

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    def ping(self) -> None:
        with read_connection(self.engine) as conn:
            conn.exec_driver_sql("SELECT 1")

    # ---- the collector's side ----

    def load_partition(self, group_id: str, partition: int, topics: Iterable[str]) -> PartitionSnapshot:
        try:
            return self._load_partition(group_id, partition, topics)
        except OperationalError as exc:
            raise StoreUnavailable(f"database unavailable ({exc.orig})") from exc

    def _load_partition(self, group_id: str, partition: int, topics: Iterable[str]) -> PartitionSnapshot:
        with read_connection(self.engine) as conn:
            rows = conn.execute(
                select(consumer_offsets.c.topic, consumer_offsets.c.next_offset).where(
                    consumer_offsets.c.group_id == group_id, consumer_offsets.c.partition == partition,
                    consumer_offsets.c.topic.in_(list(topics)))
            ).all()
            offsets = {topic: offset for topic, offset in rows}
            row = conn.execute(
                select(partition_watermarks.c.watermark, partition_watermarks.c.observed).where(
                    partition_watermarks.c.group_id == group_id, partition_watermarks.c.partition == partition)
            ).first()
            watermark = row.watermark if row is not None else None
            observed = orjson.loads(row.observed) if row is not None and row.observed is not None else {}
            windows = {
                WindowKey(r.model, r.student_version, r.window_start): WindowState.from_dict(orjson.loads(r.state))
                for r in conn.execute(
                    select(window_state).where(window_state.c.partition == partition, window_state.c.closed.is_(False)))
            }
            entries = [
                entry_from_dict(r.kind, r.model, r.request_id, orjson.loads(r.payload))
                for r in conn.execute(select(join_entries).where(join_entries.c.partition == partition))
            ]
        return PartitionSnapshot(offsets, watermark, windows, entries, observed)

    def commit_batch(
        self,
        group_id: str,
        partition: int,
        window_ms: int,
        changes: Changes,
        offsets: dict[str, tuple[int | None, int]],
        transfer_max: int = 100_000,
    ) -> None:
        """Make one batch durable; ``offsets`` maps topic -> (offset loaded/last committed, new).

        Transfer records join the set of their model, which keeps its ``transfer_max`` newest rows.
        """
        try:
            with self.engine.begin() as conn:
                self._advance_offsets(conn, group_id, partition, offsets)
                self._write_windows(conn, partition, window_ms, changes)
                self._write_entries(conn, partition, changes)
                self._add_counters(conn, partition, changes.counters.items())
                self._write_transfer(conn, changes.transfer, transfer_max)
                self._write_watermark(conn, group_id, partition, changes)
                if changes.engine is not None:
                    self._write_engine(conn, partition, changes.engine)
        except IntegrityError as exc:
            raise StoreConflict(f"partition {partition}: offsets were created by another consumer") from exc
        except OperationalError as exc:
            raise StoreUnavailable(f"database unavailable ({exc.orig})") from exc

    def load_engine(self, partition: int) -> tuple[dict[str, Any] | None, list[tuple[str, str, int, bytes]]]:
        """The columnar engine's stored scalars and blobs of a co-partition (collector.live_columns)."""
        try:
            with read_connection(self.engine) as conn:
                meta = conn.execute(select(engine_meta.c.meta).where(engine_meta.c.partition == partition)).scalar()
                rows = [(r.kind, r.model, r.seq, bytes(r.blob)) for r in conn.execute(
                    select(engine_blobs).where(engine_blobs.c.partition == partition).order_by(engine_blobs.c.seq))]
        except OperationalError as exc:
            raise StoreUnavailable(f"database unavailable ({exc.orig})") from exc
        return (None if meta is None else orjson.loads(meta)), rows

    def _write_engine(self, conn: Connection, partition: int, delta: EngineDelta) -> None:
        meta = orjson.dumps(delta.meta).decode()
        stmt = self._insert(engine_meta).values(partition=partition, meta=meta)
        conn.execute(stmt.on_conflict_do_update(index_elements=["partition"], set_={"meta": meta}))
        for kind, model, seq in delta.delete:
            where = [engine_blobs.c.partition == partition, engine_blobs.c.kind == kind, engine_blobs.c.seq == seq]
            if model:
                where.append(engine_blobs.c.model == model)
            conn.execute(delete(engine_blobs).where(*where))
        if delta.purge_through is not None:
            conn.execute(delete(engine_blobs).where(engine_blobs.c.partition == partition,
                                                    engine_blobs.c.kind.in_(["join_teacher", "join_label"]),
                                                    engine_blobs.c.last_start <= delta.purge_through))
        if delta.put:
            stmt = self._insert(engine_blobs)
            conn.execute(stmt.on_conflict_do_update(
                index_elements=["partition", "kind", "model", "seq"],
                set_={"last_start": stmt.excluded.last_start, "blob": stmt.excluded.blob}),
                [{"partition": partition, "kind": kind, "model": model, "seq": seq, "last_start": last, "blob": blob}
                 for kind, model, seq, last, blob in delta.put])

    def _write_watermark(self, conn: Connection, group_id: str, partition: int, changes: Changes) -> None:
        values: dict[str, Any] = {}
        if changes.watermark is not None:
            values["watermark"] = changes.watermark
        if changes.observed is not None:
            values["observed"] = orjson.dumps(changes.observed).decode()
        if values:
            stmt = self._insert(partition_watermarks).values(group_id=group_id, partition=partition, **values)
            conn.execute(stmt.on_conflict_do_update(index_elements=["group_id", "partition"], set_=values))

    def _advance_offsets(self, conn: Connection, group_id: str, partition: int,
                         offsets: dict[str, tuple[int | None, int]]) -> None:
        for topic, (old, new) in offsets.items():
            if old is None:
                conn.execute(consumer_offsets.insert().values(
                    group_id=group_id, topic=topic, partition=partition, next_offset=new))
                continue
            result = conn.execute(
                update(consumer_offsets)
                .where(consumer_offsets.c.group_id == group_id, consumer_offsets.c.topic == topic,
                       consumer_offsets.c.partition == partition, consumer_offsets.c.next_offset == old)
                .values(next_offset=new))
            if result.rowcount != 1:
                raise StoreConflict(f"{topic}[{partition}]: stored offset is no longer {old}; another consumer owns it")

    def _write_windows(self, conn: Connection, partition: int, window_ms: int, changes: Changes) -> None:
        now = _now_ms()
        rows = [
            {"model": k.model, "student_version": k.student_version, "window_start": k.window_start,
             "partition": partition, "window_ms": window_ms, "closed": closed,
             "state": orjson.dumps(state.to_dict()).decode(), "updated_at": now}
            for closed, group in ((False, changes.windows), (True, changes.closed))
            for k, state in group.items()
        ]
        if rows:
            stmt = self._insert(window_state)
            conn.execute(stmt.on_conflict_do_update(
                index_elements=["model", "student_version", "window_start", "partition"],
                set_={"closed": stmt.excluded.closed, "state": stmt.excluded.state,
                      "updated_at": stmt.excluded.updated_at}), rows)
        for k, count in changes.late.items():
            key = and_(window_state.c.model == k.model, window_state.c.student_version == k.student_version,
                       window_state.c.window_start == k.window_start, window_state.c.partition == partition)
            stored = conn.execute(select(window_state.c.state).where(key)).scalar()
            state = WindowState.from_dict(orjson.loads(stored)) if stored is not None else WindowState()
            state.n_late += count
            payload = orjson.dumps(state.to_dict()).decode()
            if stored is None:
                conn.execute(window_state.insert().values(
                    model=k.model, student_version=k.student_version, window_start=k.window_start,
                    partition=partition, window_ms=window_ms, closed=True, state=payload, updated_at=now))
            else:
                conn.execute(update(window_state).where(key).values(state=payload, updated_at=now))

    def _write_entries(self, conn: Connection, partition: int, changes: Changes) -> None:
        if changes.closed_starts:  # whole closed windows: no entry of theirs is upserted again
            conn.execute(delete(join_entries).where(join_entries.c.partition == partition,
                                                    join_entries.c.window_start.in_(sorted(changes.closed_starts))))
        if changes.deleted:
            conn.execute(
                delete(join_entries).where(
                    join_entries.c.partition == partition, join_entries.c.kind == bindparam("k"),
                    join_entries.c.model == bindparam("m"), join_entries.c.request_id == bindparam("r")),
                [{"k": k, "m": m, "r": r} for k, m, r in sorted(changes.deleted)])
        if changes.upserted:
            stmt = self._insert(join_entries)
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["partition", "kind", "model", "request_id"],
                    set_={"window_start": stmt.excluded.window_start, "payload": stmt.excluded.payload}),
                [{"partition": partition, "kind": e.kind, "model": e.model, "request_id": e.request_id,
                  "window_start": e.window_start, "payload": orjson.dumps(entry_to_dict(e)).decode()}
                 for e in changes.upserted.values()])

    def _write_transfer(self, conn: Connection, records: list[TransferRecord], keep: int) -> None:
        if not records:
            return
        stmt = self._insert(transfer_set).on_conflict_do_nothing(index_elements=["model", "request_id"])
        conn.execute(stmt, [{"model": r.model, "request_id": r.request_id, "ts": r.ts_ms, "student_version": r.student_version,
                             "payload": orjson.dumps(transfer_to_dict(r)).decode()} for r in records])
        for model in sorted({r.model for r in records}):
            # The ts of the keep-th newest row: everything strictly older goes (ties at the boundary stay).
            boundary = conn.execute(
                select(transfer_set.c.ts).where(transfer_set.c.model == model)
                .order_by(transfer_set.c.ts.desc()).offset(keep - 1).limit(1)).scalar()
            if boundary is not None:
                conn.execute(delete(transfer_set).where(transfer_set.c.model == model, transfer_set.c.ts < boundary))

    def transfer_records(self, model: str, start_ms: int | None = None, end_ms: int | None = None) -> list[TransferRecord]:
        """A model's transfer set in [start_ms, end_ms), oldest first."""
        query = select(transfer_set).where(transfer_set.c.model == model)
        if start_ms is not None:
            query = query.where(transfer_set.c.ts >= start_ms)
        if end_ms is not None:
            query = query.where(transfer_set.c.ts < end_ms)
        with read_connection(self.engine) as conn:
            return [transfer_from_row(r.model, r.request_id, r.ts, r.student_version, orjson.loads(r.payload))
                    for r in conn.execute(query.order_by(transfer_set.c.ts, transfer_set.c.request_id))]

    def transfer_count(self, model: str) -> int:
        with read_connection(self.engine) as conn:
            return int(conn.execute(select(func.count()).where(transfer_set.c.model == model)).scalar() or 0)

    def _add_counters(self, conn: Connection, partition: int, items: Iterable[tuple[tuple[str, str], int]]) -> None:
        rows = [{"kind": kind, "partition": partition, "reason": reason, "count": count}
                for (kind, reason), count in items if count]
        if rows:
            stmt = self._insert(event_counters)
            conn.execute(stmt.on_conflict_do_update(
                index_elements=["kind", "partition", "reason"],
                set_={"count": event_counters.c.count + stmt.excluded.count}), rows)

    # ---- the readers' side ----

    def windows(
        self,
        model: str | None = None,
        student_version: str | None = None,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> dict[WindowKey, tuple[WindowState, bool, int]]:
        """Stored windows merged across partitions: key -> (state, final, window_ms)."""
        query = _window_filter(select(window_state), model, student_version, start_ms, end_ms)
        merged: dict[WindowKey, tuple[WindowState, bool, int]] = {}
        with read_connection(self.engine) as conn:
            _merge_rows(conn.execute(query.order_by(window_state.c.window_start, window_state.c.partition)), merged)
        return merged

    def window_versions_since(self, updated_after_ms: int) -> dict[WindowKey, tuple[int, int]]:
        """Windows with a row written after ``updated_after_ms``: key -> (rows, newest write); key columns only.

        With ``windows_of``, for readers that keep their own aggregate over all windows (the SLI counters
        of /metrics): they re-read only the windows whose version moved.
        """
        query = (select(window_state.c.model, window_state.c.student_version, window_state.c.window_start,
                        func.count(), func.max(window_state.c.updated_at))
                 .where(window_state.c.updated_at > updated_after_ms)
                 .group_by(window_state.c.model, window_state.c.student_version, window_state.c.window_start))
        with read_connection(self.engine) as conn:
            return {WindowKey(m, v, int(w)): (int(n), int(u)) for m, v, w, n, u in conn.execute(query)}

    def windows_of(self, keys: Iterable[WindowKey]) -> dict[WindowKey, tuple[WindowState, bool, int]]:
        """The given windows merged across partitions, as ``windows`` returns them."""
        wanted = list(keys)
        merged: dict[WindowKey, tuple[WindowState, bool, int]] = {}
        with read_connection(self.engine) as conn:
            for i in range(0, len(wanted), 500):  # bounded IN lists
                chunk = wanted[i:i + 500]
                query = select(window_state).where(
                    tuple_(window_state.c.model, window_state.c.student_version, window_state.c.window_start).in_(chunk))
                _merge_rows(conn.execute(query.order_by(window_state.c.window_start, window_state.c.partition)), merged)
        return merged

    def offsets(self) -> dict[tuple[str, str, int], int]:
        """Stored next offsets: (group, topic, partition) -> offset."""
        with read_connection(self.engine) as conn:
            return {(g, t, p): o for g, t, p, o in conn.execute(select(
                consumer_offsets.c.group_id, consumer_offsets.c.topic, consumer_offsets.c.partition, consumer_offsets.c.next_offset))}

    def data_version(self, model: str) -> tuple[int, int]:
        """(rows, newest update) of a model's windows: changes whenever any of its windows does."""
        with read_connection(self.engine) as conn:
            rows, newest = conn.execute(
                select(func.count(), func.max(window_state.c.updated_at)).where(window_state.c.model == model)).one()
        return int(rows), int(newest or 0)

    def bucket_versions(self, model: str, student_version: str | None, start_ms: int | None, end_ms: int | None,
                        step_ms: int) -> dict[tuple[str, int], tuple[int, int]]:
        """(student_version, bucket start) -> (rows, newest update) of a model's windows in ``step_ms`` buckets."""
        bucket = (window_state.c.window_start - window_state.c.window_start % step_ms).label("bucket")
        query = _window_filter(
            select(window_state.c.student_version, bucket, func.count(), func.max(window_state.c.updated_at)),
            model, student_version, start_ms, end_ms)
        with read_connection(self.engine) as conn:
            rows = conn.execute(query.group_by(window_state.c.student_version, bucket)).all()
        return {(v, int(b)): (int(n), int(u or 0)) for v, b, n, u in rows}

    def counters(self) -> dict[tuple[str, str], int]:
        """Counts per (kind, reason), summed over partitions."""
        out: dict[tuple[str, str], int] = {}
        with read_connection(self.engine) as conn:
            for kind, reason, count in conn.execute(
                    select(event_counters.c.kind, event_counters.c.reason, event_counters.c.count)):
                out[(kind, reason)] = out.get((kind, reason), 0) + count
        return out

    def put_reference(self, model: str, reference: Reference) -> None:
        stmt = self._insert(references).values(
            model=model, fingerprint=reference.fingerprint,
            data=orjson.dumps(reference.to_dict()).decode(), updated_at=_now_ms())
        with self.engine.begin() as conn:
            conn.execute(stmt.on_conflict_do_update(
                index_elements=["model"],
                set_={"fingerprint": stmt.excluded.fingerprint, "data": stmt.excluded.data,
                      "updated_at": stmt.excluded.updated_at}))

    def change_signature(self, model: str) -> tuple[int, int, int, str | None]:
        """Changes whenever any of the model's windows or its reference does: (rows, newest update, sum of
        updates, reference fingerprint). The sum catches two partitions writing within one millisecond,
        which the newest update alone would miss; a row has one writer, whose transactions take longer."""
        with read_connection(self.engine) as conn:
            rows, newest, total = conn.execute(
                select(func.count(), func.max(window_state.c.updated_at), func.sum(window_state.c.updated_at))
                .where(window_state.c.model == model)).one()
            fingerprint = conn.execute(select(references.c.fingerprint).where(references.c.model == model)).scalar()
        return int(rows), int(newest or 0), int(total or 0), fingerprint

    def references(self) -> dict[str, Reference]:
        with read_connection(self.engine) as conn:
            return {r.model: Reference.from_dict(orjson.loads(r.data)) for r in conn.execute(select(references))}
