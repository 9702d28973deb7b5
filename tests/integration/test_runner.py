"""The training runner over HTTP with a real database: signed webhooks, idempotent jobs, distillation, the registry."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
from fastapi.testclient import TestClient

from kdwatch.api import ApiSettings, create_app
from kdwatch.runner.distill import TrainConfig
from kdwatch.runner.service import Runner, RunnerConfig, create_runner_app
from kdwatch.slo.webhooks import headers, new_secret
from kdwatch.storage.jobs import JobStore
from kdwatch.storage.sql import SqlStore
from tests.record_joiner.join import PartitionJoiner
from tests.unit.runner.test_distill import synthetic_transfer

SECRET = new_secret()
T0 = 1_795_000_000_000


def request_body(model: str = "m", **extra: object) -> bytes:
    return orjson.dumps({"type": "kdwatch.retrain", "webhook_id": "msg_1", "model": model, "student_version": "s1",
                         "teacher_version": "t1", "trigger": {"reason": "slo agreement page"},
                         "data": {"from": "2026-11-18T00:00:00Z", "to": "2026-11-19T00:00:00Z"}, **extra})


def post(client: TestClient, body: bytes, msg_id: str = "msg_1", secret: str = SECRET, ts: int | None = None) -> object:
    return client.post("/webhooks/retrain", content=body, headers=headers(secret, msg_id, body, ts))


def wait_metric(client: TestClient, series: str, timeout_s: float = 10.0) -> float:
    """The value of one series of the runner's /metrics, waiting for it to appear (the counter follows the job)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith(series + " "):
                return float(line.rsplit(" ", 1)[1])
        assert time.monotonic() < deadline, f"{series} not in /metrics"
        time.sleep(0.1)


def wait_finished(client: TestClient, job_id: str, timeout_s: float = 60.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s}s")


@pytest.fixture
def runner(store: SqlStore, tmp_path: Path) -> Runner:
    changes = PartitionJoiner(60_000, 600_000).end_batch({})
    changes.transfer = synthetic_transfer(1_000)
    store.commit_batch("g", 0, 60_000, changes, {"preds": (None, 1)})
    config = RunnerConfig(SECRET, tmp_path / "registry", TrainConfig(epochs=15), poll_interval_s=0.05)
    return Runner(store, JobStore(store.engine), config)


def test_a_signed_retrain_request_distils_gates_and_registers_a_new_student(runner: Runner) -> None:
    with TestClient(create_runner_app(runner)) as client:
        first = post(client, request_body())
        assert first.status_code == 202, first.text  # type: ignore[attr-defined]
        job = wait_finished(client, "msg_1")
        again = post(client, request_body())  # the same delivery, retried by the sender
        assert again.status_code == 200 and again.json()["id"] == "msg_1"  # type: ignore[attr-defined]
        assert [j["id"] for j in client.get("/v1/jobs").json()["jobs"]] == ["msg_1"]
        finished = wait_metric(client, 'kdwatch_runner_jobs_finished_total{model="m",outcome="promoted"}')
        assert finished == 1.0
        assert wait_metric(client, 'kdwatch_runner_job_duration_seconds_count{model="m"}') == 1.0
        assert wait_metric(client, "kdwatch_runner_job_running") == 0.0
    assert job["status"] == "promoted", job["log"]
    assert job["student_version"] == "s1-kd1" and job["parent_version"] == "s1"
    metrics = job["metrics"]
    assert metrics["candidate"]["agreement"] > metrics["current"]["agreement"] + 0.01  # type: ignore[index]
    assert "epoch 15/15" in str(job["log"])
    assert runner.registry.current("m") == "s1-kd1"
    meta = runner.registry.metadata("m", "s1-kd1")
    assert meta["job_id"] == "msg_1" and meta["features"] == ["f0", "f1", "f2", "f3"]
    assert meta["training_config"]["epochs"] == 15
    # The REST API shows the job beside the model's windows.
    with TestClient(create_app(runner.store, ApiSettings())) as api:
        listed = api.get("/v1/models/m/retrain-jobs").json()["jobs"]
        assert [(j["id"], j["status"], j["student_version"]) for j in listed] == [("msg_1", "promoted", "s1-kd1")]
        assert api.get("/v1/models/other/retrain-jobs").json() == {"jobs": []}


@pytest.mark.parametrize(
    ("case", "expected"),
    [("bad signature", 401), ("stale timestamp", 401), ("future timestamp", 401), ("no signature", 401),
     ("not a retrain request", 422), ("inverted range", 422)],
)
def test_a_bad_delivery_is_rejected_with_a_json_4xx_and_makes_no_job(runner: Runner, case: str, expected: int) -> None:
    body = request_body()
    with TestClient(create_runner_app(runner, start_worker=False)) as client:
        if case == "bad signature":
            response = post(client, body, secret=new_secret())
        elif case == "stale timestamp":
            response = post(client, body, ts=int(time.time()) - 301)
        elif case == "future timestamp":
            response = post(client, body, ts=int(time.time()) + 301)
        elif case == "no signature":
            response = client.post("/webhooks/retrain", content=body)
        elif case == "not a retrain request":
            response = post(client, orjson.dumps({"type": "something.else"}))
        else:
            response = post(client, request_body(data={"from": "2026-11-19T00:00:00Z", "to": "2026-11-18T00:00:00Z"}))
        assert response.status_code == expected  # type: ignore[attr-defined]
        assert response.json()["error"] in ("unauthorized", "invalid_request")  # type: ignore[attr-defined]
        assert client.get("/v1/jobs").json() == {"jobs": []}


def test_a_range_without_enough_transfer_data_fails_the_job_with_its_reason(runner: Runner) -> None:
    body = request_body(data={"from": "2030-01-01T00:00:00Z", "to": "2030-01-02T00:00:00Z"})
    with TestClient(create_runner_app(runner)) as client:
        assert post(client, body, msg_id="msg_empty").status_code == 202  # type: ignore[attr-defined]
        job = wait_finished(client, "msg_empty")
        assert wait_metric(client, 'kdwatch_runner_jobs_finished_total{model="m",outcome="failed"}') == 1.0
    assert job["status"] == "failed"
    assert "0 records in the range" in str(job["error"])
    assert runner.registry.current("m") is None


def test_jobs_of_one_model_never_run_at_once(store: SqlStore) -> None:
    jobs = JobStore(store.engine)
    for i, model in enumerate(["a", "a", "b"]):
        jobs.create(f"j{i}", model, {"model": model}, T0 + i)
    first, second = jobs.claim_next(T0), jobs.claim_next(T0)
    assert (first and first["id"], second and second["id"]) == ("j0", "j2")  # j1 waits for j0 (same model)
    assert jobs.claim_next(T0) is None
    jobs.finish("j0", "promoted", T0 + 10, log="")
    third = jobs.claim_next(T0 + 11)
    assert third is not None and third["id"] == "j1"
    # A runner that died mid-job: its job goes back to the queue after the stale limit.
    assert jobs.requeue_stale(T0 + 12) == 2
    assert {j["status"] for j in jobs.list()} == {"queued", "promoted"}
