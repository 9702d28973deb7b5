"""The training runner's job queue in SQL: created idempotently by webhook-id, claimed one at a time per model."""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import Engine, and_, exists, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import aliased

from kdwatch.storage.schema import retrain_jobs
from kdwatch.storage.sql import read_connection
from kdwatch.timestamps import rfc3339

QUEUED, RUNNING, PROMOTED, REJECTED, FAILED = "queued", "running", "promoted", "rejected", "failed"


def _job(row: Any) -> dict[str, Any]:
    return {
        "id": row.id, "model": row.model, "status": row.status, "request": orjson.loads(row.request),
        "created_at": row.created_at, "started_at": row.started_at, "finished_at": row.finished_at,
        "parent_version": row.parent_version, "student_version": row.student_version,
        "metrics": None if row.metrics is None else orjson.loads(row.metrics), "log": row.log, "error": row.error,
    }


def public_job(job: dict[str, Any]) -> dict[str, Any]:
    """A job as the APIs show it: times in RFC 3339."""
    out = dict(job)
    for key in ("created_at", "started_at", "finished_at"):
        out[key] = None if job[key] is None else rfc3339(job[key])
    return out


class JobStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert

    def create(self, job_id: str, model: str, request: dict[str, Any], now_ms: int) -> tuple[dict[str, Any], bool]:
        """The job for this webhook-id, and whether this call created it (a repeated delivery does not)."""
        stmt = self._insert(retrain_jobs).values(
            id=job_id, model=model, status=QUEUED, request=orjson.dumps(request).decode(), created_at=now_ms, log="",
        ).on_conflict_do_nothing(index_elements=["id"]).returning(retrain_jobs.c.id)
        with self.engine.begin() as conn:
            created = conn.execute(stmt).first() is not None
            row = conn.execute(select(retrain_jobs).where(retrain_jobs.c.id == job_id)).one()
        return _job(row), created

    def get(self, job_id: str) -> dict[str, Any] | None:
        with read_connection(self.engine) as conn:
            row = conn.execute(select(retrain_jobs).where(retrain_jobs.c.id == job_id)).first()
        return None if row is None else _job(row)

    def list(self, model: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        query = select(retrain_jobs).order_by(retrain_jobs.c.created_at.desc(), retrain_jobs.c.id).limit(limit)
        if model is not None:
            query = query.where(retrain_jobs.c.model == model)
        with read_connection(self.engine) as conn:
            return [_job(r) for r in conn.execute(query)]

    def status_counts(self) -> dict[tuple[str, str], int]:
        """Jobs per (model, status): one grouped query (for /metrics)."""
        query = select(retrain_jobs.c.model, retrain_jobs.c.status, func.count()).group_by(retrain_jobs.c.model, retrain_jobs.c.status)
        with read_connection(self.engine) as conn:
            return {(m, s): int(n) for m, s, n in conn.execute(query)}

    def claim_next(self, now_ms: int) -> dict[str, Any] | None:
        """Mark the oldest queued job whose model has no running job as running, and return it.

        The update is conditional (still queued, no running sibling), so two runner replicas never
        run the same job or two jobs of one model at once.
        """
        other = aliased(retrain_jobs)
        with self.engine.begin() as conn:
            candidates = conn.execute(
                select(retrain_jobs.c.id, retrain_jobs.c.model).where(retrain_jobs.c.status == QUEUED)
                .order_by(retrain_jobs.c.created_at, retrain_jobs.c.id).limit(50)).all()
        for job_id, model in candidates:
            busy = exists().where(and_(other.c.model == model, other.c.status == RUNNING))
            with self.engine.begin() as conn:
                claimed = conn.execute(
                    update(retrain_jobs).where(retrain_jobs.c.id == job_id, retrain_jobs.c.status == QUEUED, ~busy)
                    .values(status=RUNNING, started_at=now_ms)).rowcount == 1
            if claimed:
                return self.get(job_id)
        return None

    def progress(self, job_id: str, log: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(retrain_jobs).where(retrain_jobs.c.id == job_id).values(log=log))

    def finish(self, job_id: str, status: str, now_ms: int, *, log: str, parent_version: str | None = None,
               student_version: str | None = None, metrics: dict[str, Any] | None = None, error: str | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(retrain_jobs).where(retrain_jobs.c.id == job_id).values(
                status=status, finished_at=now_ms, log=log, parent_version=parent_version, student_version=student_version,
                metrics=None if metrics is None else orjson.dumps(metrics).decode(), error=error))

    def requeue_stale(self, older_than_ms: int) -> int:
        """Jobs left running by a runner that died (started before ``older_than_ms``) go back to the queue."""
        with self.engine.begin() as conn:
            return int(conn.execute(
                update(retrain_jobs).where(retrain_jobs.c.status == RUNNING, retrain_jobs.c.started_at < older_than_ms)
                .values(status=QUEUED, started_at=None)).rowcount)
