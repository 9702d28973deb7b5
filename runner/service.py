"""``kdwatch runner``: receives signed retrain webhooks, queues jobs, distils, gates and registers students.

    POST /webhooks/retrain   a kdwatch.retrain delivery (Standard Webhooks signature, +-5 min timestamp);
                             202 with the new job, 200 with the existing one for a repeated webhook-id
    GET  /v1/jobs            jobs, newest first (?model=)
    GET  /v1/jobs/{id}       one job: status, log, metrics, the new student_version
    GET  /healthz
    GET  /metrics            the runner's own metrics (README "Self-metrics")

A worker thread runs one job at a time (and the queue's claim never runs two jobs of one model at
once, even across replicas): fetch the transfer set of the range the webhook names, distil
(:mod:`runner.distill`), evaluate both students on the held-out split, and register and promote the
new student only when it beats the current one by ``promote_margin``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from rich.progress import Progress

from kdwatch.httperrors import install_json_errors
from kdwatch.runner.distill import TrainConfig, distil, to_arrays
from kdwatch.runner.registry import Registry
from kdwatch.runner.trainers import Candidate, promotes, run_trainer
from kdwatch.slo.webhooks import WebhookVerificationError, verify
from kdwatch.storage.jobs import FAILED, PROMOTED, REJECTED, JobStore, public_job
from kdwatch.storage.sql import SqlStore

log = logging.getLogger("kdwatch.runner")
MAX_BODY_BYTES = 1024 * 1024  # a retrain request is a small JSON document


@dataclass
class RunnerConfig:
    webhook_secret: str
    registry_dir: Path
    train: TrainConfig
    poll_interval_s: float = 1.0
    stale_after_ms: int = 3_600_000  # a job running longer than this was left by a dead runner
    show_progress: bool = False


def _ms(text: Any, field: str) -> int:
    if not isinstance(text, str):
        raise ValueError(f"{field} must be an RFC 3339 string")
    try:
        return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        raise ValueError(f"{field} is not RFC 3339") from None


def parse_request(body: bytes) -> dict[str, Any]:
    """The retrain request (slo.notify.retrain_payload), checked; ValueError says what is wrong."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ValueError("the body is not JSON") from None
    if not isinstance(payload, dict) or payload.get("type") != "kdwatch.retrain":
        raise ValueError("type must be kdwatch.retrain")
    if not isinstance(payload.get("model"), str) or not payload["model"]:
        raise ValueError("model must be a non-empty string")
    data = payload.get("data")
    if not isinstance(data, dict):
        raise ValueError("data must be an object with from and to")
    if _ms(data.get("from"), "data.from") >= _ms(data.get("to"), "data.to"):
        raise ValueError("data.from must be before data.to")
    return payload


class Runner:
    """The job worker: claims queued jobs and runs them, one at a time."""

    def __init__(self, store: SqlStore, jobs: JobStore, config: RunnerConfig,
                 clock: Callable[[], float] = time.time) -> None:
        self.store, self.jobs, self.config, self.clock = store, jobs, config, clock
        self.registry = Registry(config.registry_dir)
        self.wake = threading.Event()
        self.metrics = CollectorRegistry()
        self.m_finished = Counter("kdwatch_runner_jobs_finished", "Jobs this runner finished, per model and outcome "
                                  "(promoted, rejected, failed)", ["model", "outcome"], registry=self.metrics)
        self.m_duration = Histogram("kdwatch_runner_job_duration_seconds", "One job: transfer set, distillation, gate",
                                    ["model"], buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600), registry=self.metrics)
        self.m_running = Gauge("kdwatch_runner_job_running", "1 while this runner runs a job", registry=self.metrics)
        self.m_last_poll = Gauge("kdwatch_runner_last_poll_timestamp_seconds", "When the worker last looked for a job "
                                 "(epoch seconds)", registry=self.metrics)

    def _now(self) -> int:
        return int(self.clock() * 1000)

    def run_once(self) -> dict[str, Any] | None:
        """Claim and run the next job; the finished job, or None when the queue is empty."""
        job = self.jobs.claim_next(self._now())
        self.m_last_poll.set(self.clock())
        if job is None:
            return None
        started = time.monotonic()
        self.m_running.set(1)
        try:
            self.run_job(job)
        finally:
            self.m_running.set(0)
            self.m_duration.labels(job["model"]).observe(time.monotonic() - started)
        finished = self.jobs.get(job["id"])
        if finished is not None:
            self.m_finished.labels(job["model"], str(finished["status"])).inc()
        return finished

    def run_job(self, job: dict[str, Any]) -> None:
        lines: list[str] = []

        def note(line: str) -> None:
            stamp = datetime.fromtimestamp(self.clock()).isoformat(timespec="seconds")
            lines.append(f"{stamp} {line}")
            log.info("job %s: %s", job["id"], line)

        request, model, train = job["request"], job["model"], self.config.train
        parent = request.get("student_version") or self.registry.current(model)
        try:
            start, end = _ms(request["data"]["from"], "data.from"), _ms(request["data"]["to"], "data.to")
            records = self.store.transfer_records(model, start, end)
            note(f"transfer set {request['data']['from']} .. {request['data']['to']}: {len(records)} records")
            if len(records) < train.min_records:
                raise ValueError(f"the transfer set holds {len(records)} records in the range; at least {train.min_records} needed")
            with Progress(disable=not self.config.show_progress, transient=True) as progress:
                task = progress.add_task(f"distilling {model}", total=train.epochs)

                def on_epoch(row: dict[str, float]) -> None:
                    note(f"epoch {int(row['epoch'])}/{train.epochs} " + " ".join(
                        f"{k.replace('agreement', 'held-out agreement')} {v:.4f}" for k, v in row.items() if k != "epoch"))
                    progress.update(task, advance=1)
                    self.jobs.progress(job["id"], "\n".join(lines))

                result = self._train(request, records, note, on_epoch)
            metrics = {"candidate": result.candidate, "current": result.current, "promote_margin": train.promote_margin}
            note(f"held-out agreement: candidate {result.candidate['agreement']:.4f}, current {result.current['agreement']:.4f}")
            if not promotes(result.candidate, result.current, train.promote_margin):
                note(f"rejected: the candidate does not beat the current student by {train.promote_margin}")
                self.jobs.finish(job["id"], REJECTED, self._now(), log="\n".join(lines), parent_version=parent, metrics=metrics)
                return
            version = self.registry.next_version(model, parent)
            self.registry.register(model, version, result.module, {
                "parent_version": parent, "job_id": job["id"], "metrics": metrics, "architecture": result.architecture,
                "features": result.features, "training_config": train.model_dump(mode="json"),
                "data": request["data"], "n_train": result.n_train, "n_holdout": result.n_holdout, "epochs": result.epochs,
            })
            self.registry.promote(model, version)
            note(f"promoted {version} (parent {parent})")
            self.jobs.finish(job["id"], PROMOTED, self._now(), log="\n".join(lines), parent_version=parent,
                             student_version=version, metrics=metrics)
        except Exception as exc:  # a failed job is recorded with its reason; the runner goes on with the next
            note(f"failed: {type(exc).__name__}: {exc}")
            self.jobs.finish(job["id"], FAILED, self._now(), log="\n".join(lines), parent_version=parent,
                             error=f"{type(exc).__name__}: {exc}")

    def _train(self, request: dict[str, Any], records: list[Any], note: Callable[[str], None],
               on_epoch: Callable[[dict[str, float]], None]) -> Candidate:
        """The candidate student: from the request's (or the config's) trainer entry point, else the built-in MLP."""
        train = self.config.train
        trainer = request.get("trainer") or train.trainer
        if trainer is not None:
            if trainer not in (*train.trainers, train.trainer):
                raise ValueError(f"trainer {trainer!r} is not among the runner's trainers (training config `trainers`)")
            note(f"training with {trainer}")
            return run_trainer(trainer, records, train, on_epoch)
        data = to_arrays(records, train.holdout)
        note(f"{len(data.feature_names)} numeric features, {int((~data.holdout).sum())} training and "
             f"{int(data.holdout.sum())} held-out records, {int((data.labels >= 0).sum())} labelled")
        result = distil(data, train, on_epoch)
        return Candidate(result.module, result.candidate, result.current,
                         {"type": "mlp", "n_features": len(data.feature_names), "hidden": list(train.hidden),
                          "n_classes": int(data.teacher_probs.shape[1])}, data.feature_names, result.epochs,
                         int((~data.holdout).sum()), int(data.holdout.sum()))

    def serve_forever(self, stop: threading.Event) -> None:
        requeued = self.jobs.requeue_stale(self._now() - self.config.stale_after_ms)
        if requeued:
            log.warning("re-queued %d job(s) left running by a runner that stopped", requeued)
        while not stop.is_set():
            if self.run_once() is None:
                self.wake.wait(self.config.poll_interval_s)
                self.wake.clear()


def create_runner_app(runner: Runner, start_worker: bool = True) -> FastAPI:
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        worker = threading.Thread(target=runner.serve_forever, args=(stop,), name="kdwatch-runner-worker", daemon=True)
        if start_worker:
            worker.start()
        yield
        stop.set()
        runner.wake.set()
        if start_worker:
            worker.join(timeout=30)

    app = FastAPI(title="kdwatch runner", version="1", lifespan=lifespan)
    install_json_errors(app, MAX_BODY_BYTES)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(runner.metrics), media_type=CONTENT_TYPE_LATEST)

    @app.post("/webhooks/retrain", status_code=202)
    async def retrain(request: Request) -> JSONResponse:
        body = await request.body()
        try:
            webhook_id = verify(runner.config.webhook_secret, request.headers, body)
        except WebhookVerificationError as exc:
            raise HTTPException(401, str(exc)) from None
        try:
            payload = parse_request(body)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        job, created = runner.jobs.create(webhook_id, payload["model"], payload, int(time.time() * 1000))
        if created:
            runner.wake.set()
        return JSONResponse(public_job(job), status_code=202 if created else 200)

    @app.get("/v1/jobs")
    def jobs(model: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        return {"jobs": [public_job(j) for j in runner.jobs.list(model, limit)]}

    @app.get("/v1/jobs/{job_id}")
    def job(job_id: str) -> dict[str, Any]:
        found = runner.jobs.get(job_id)
        if found is None:
            raise HTTPException(404, "no such job")
        return public_job(found)

    return app

