"""The SLO engine's durable side: its state with a leader lease, the outbox, deliveries, silences."""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from kdwatch.slo.dispatch import Delivery
from kdwatch.slo.engine import Silence
from kdwatch.storage.schema import delivery_log, disabled_receivers, outbox, silences, slo_config, slo_engine
from kdwatch.storage.sql import read_connection


class SloSqlStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert

    # ---- leadership and engine state ----

    def acquire_lease(self, name: str, owner: str, now_ms: int, ttl_ms: int) -> bool:
        """Become (or stay) the engine's single leader; only the leader evaluates and notifies."""
        with self.engine.begin() as conn:
            conn.execute(self._insert(slo_engine).values(
                name=name, state="{}", evaluated_through=0, leader=None, lease_until=0).on_conflict_do_nothing())
            result = conn.execute(
                update(slo_engine)
                .where(slo_engine.c.name == name,
                       (slo_engine.c.leader == owner) | (slo_engine.c.leader.is_(None)) | (slo_engine.c.lease_until < now_ms))
                .values(leader=owner, lease_until=now_ms + ttl_ms))
            return result.rowcount == 1

    def load_engine(self, name: str) -> tuple[dict[str, Any], int]:
        with read_connection(self.engine) as conn:
            row = conn.execute(select(slo_engine.c.state, slo_engine.c.evaluated_through).where(slo_engine.c.name == name)).first()
        if row is None:
            return {}, 0
        return orjson.loads(row.state), int(row.evaluated_through)

    def save_engine(self, name: str, owner: str, state: dict[str, Any], evaluated_through: int,
                    deliveries: list[dict[str, Any]]) -> bool:
        """Engine state, progress and the notifications it produced, in one transaction (the outbox).

        False (and nothing written) when ``owner`` no longer holds the lease.
        """
        with self.engine.begin() as conn:
            result = conn.execute(
                update(slo_engine).where(slo_engine.c.name == name, slo_engine.c.leader == owner)
                .values(state=orjson.dumps(state).decode(), evaluated_through=evaluated_through))
            if result.rowcount != 1:
                conn.rollback()
                return False
            if deliveries:
                conn.execute(self._insert(outbox).on_conflict_do_nothing(index_elements=["id"]), deliveries)
        return True

    # ---- the outbox ----

    def due_deliveries(self, now_ms: int, limit: int) -> list[Delivery]:
        with read_connection(self.engine) as conn:
            rows = conn.execute(
                select(outbox.c.id, outbox.c.receiver, outbox.c.payload, outbox.c.attempts, outbox.c.group_key)
                .where(outbox.c.status == "pending", outbox.c.next_attempt_at <= now_ms)
                .order_by(outbox.c.created_at, outbox.c.id).limit(limit)).all()
        return [Delivery(r.id, r.receiver, r.payload.encode(), r.attempts, r.group_key) for r in rows]

    def retrains_in_flight(self) -> set[str]:
        """Models whose retrain request is not yet delivered (or given up)."""
        with read_connection(self.engine) as conn:
            return {g for (g,) in conn.execute(select(outbox.c.group_key).where(
                outbox.c.receiver == "retrain", outbox.c.status == "pending"))}

    def last_delivered_at(self, receiver: str, group_key: str) -> int | None:
        with read_connection(self.engine) as conn:
            return conn.execute(
                select(func.max(delivery_log.c.at)).select_from(delivery_log.join(outbox, delivery_log.c.outbox_id == outbox.c.id))
                .where(outbox.c.receiver == receiver, outbox.c.group_key == group_key, outbox.c.status == "delivered",
                       delivery_log.c.status_code >= 200, delivery_log.c.status_code < 300)).scalar()

    def retry_now(self, now_ms: int, receiver: str | None = None) -> int:
        """Make every pending delivery (of ``receiver``) due at ``now_ms``; how many. For after a receiver is fixed."""
        query = update(outbox).where(outbox.c.status == "pending", outbox.c.next_attempt_at > now_ms)
        if receiver is not None:
            query = query.where(outbox.c.receiver == receiver)
        with self.engine.begin() as conn:
            return int(conn.execute(query.values(next_attempt_at=now_ms)).rowcount)

    def postpone(self, delivery_ids: list[str], until_ms: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(outbox).where(outbox.c.id.in_(delivery_ids)).values(next_attempt_at=until_ms))

    def record_attempt(self, delivery_id: str, attempt: int, now_ms: int, status_code: int | None, error: str | None,
                       duration_ms: int, status: str, next_attempt_at: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(outbox).where(outbox.c.id == delivery_id).values(
                status=status, attempts=attempt, next_attempt_at=next_attempt_at, last_status_code=status_code,
                last_error=error))
            conn.execute(insert(delivery_log).values(outbox_id=delivery_id, attempt=attempt, at=now_ms,
                                                     status_code=status_code, error=error, duration_ms=duration_ms))

    def disable_receiver(self, receiver: str, now_ms: int, reason: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(self._insert(disabled_receivers).values(receiver=receiver, at=now_ms, reason=reason)
                         .on_conflict_do_nothing())

    def disabled_receivers(self) -> set[str]:
        with read_connection(self.engine) as conn:
            return {r for (r,) in conn.execute(select(disabled_receivers.c.receiver))}

    def enable_receiver(self, receiver: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(disabled_receivers.delete().where(disabled_receivers.c.receiver == receiver))

    def deliveries(self) -> list[dict[str, Any]]:
        """Every outbox entry with its outcome and attempts (the delivery log)."""
        with read_connection(self.engine) as conn:
            rows = conn.execute(select(outbox).order_by(outbox.c.created_at, outbox.c.id)).mappings().all()
            attempts = conn.execute(select(delivery_log).order_by(delivery_log.c.id)).mappings().all()
        log: dict[str, list[dict[str, Any]]] = {}
        for a in attempts:
            log.setdefault(a["outbox_id"], []).append(
                {"attempt": a["attempt"], "at": a["at"], "status_code": a["status_code"], "error": a["error"],
                 "duration_ms": a["duration_ms"]})
        return [{**{k: v for k, v in r.items() if k != "payload"}, "payload": orjson.loads(r["payload"]),
                 "log": log.get(r["id"], [])} for r in rows]

    def delivery_counts(self) -> dict[tuple[str, str], int]:
        """Outbox entries per (receiver, status): one grouped query (for /metrics)."""
        query = select(outbox.c.receiver, outbox.c.status, func.count()).group_by(outbox.c.receiver, outbox.c.status)
        with read_connection(self.engine) as conn:
            return {(r, s): int(n) for r, s, n in conn.execute(query)}

    def pending_backlog(self) -> dict[str, tuple[int, int]]:
        """Per receiver: (notifications still pending, created_at of the oldest, epoch ms)."""
        query = (select(outbox.c.receiver, func.count(), func.min(outbox.c.created_at))
                 .where(outbox.c.status == "pending").group_by(outbox.c.receiver))
        with read_connection(self.engine) as conn:
            return {r: (int(n), int(oldest)) for r, n, oldest in conn.execute(query)}

    def lease_until(self, name: str = "default") -> int | None:
        """When the engine's leader lease runs out (epoch ms; renewed every cycle), None before a first cycle."""
        with read_connection(self.engine) as conn:
            value = conn.execute(select(slo_engine.c.lease_until).where(slo_engine.c.name == name)).scalar()
        return None if value is None else int(value)

    # ---- the SLO document ----

    def get_slo_document(self, name: str = "default") -> dict[str, Any] | None:
        with read_connection(self.engine) as conn:
            text = conn.execute(select(slo_config.c.document).where(slo_config.c.name == name)).scalar()
        return None if text is None else orjson.loads(text)

    def put_slo_document(self, document: dict[str, Any], now_ms: int, name: str = "default") -> None:
        stmt = self._insert(slo_config).values(name=name, document=orjson.dumps(document).decode(), updated_at=now_ms)
        with self.engine.begin() as conn:
            conn.execute(stmt.on_conflict_do_update(index_elements=["name"], set_={
                "document": stmt.excluded.document, "updated_at": stmt.excluded.updated_at}))

    # ---- silences ----

    def add_silence(self, silence: Silence) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(silences).values(
                id=silence.id, matchers=orjson.dumps(silence.matchers).decode(), starts_at=silence.starts_at,
                ends_at=silence.ends_at, created_by=silence.created_by, comment=silence.comment))

    def expire_silence(self, silence_id: str, now_ms: int) -> bool:
        with self.engine.begin() as conn:
            return conn.execute(update(silences).where(silences.c.id == silence_id, silences.c.ends_at > now_ms)
                                .values(ends_at=now_ms)).rowcount == 1

    def silences(self) -> list[Silence]:
        with read_connection(self.engine) as conn:
            return [Silence(r.id, orjson.loads(r.matchers), r.starts_at, r.ends_at, r.created_by, r.comment)
                    for r in conn.execute(select(silences).order_by(silences.c.starts_at))]
