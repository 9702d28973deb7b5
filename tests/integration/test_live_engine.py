"""The live SLO engine on a real database, with real HTTP receivers and a real Alertmanager."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from kdwatch.analyzer.window import WindowState
from kdwatch.collector.records import Changes, WindowKey
from kdwatch.devkafka import free_port
from kdwatch.slo.config import parse_slo_file
from kdwatch.slo.dispatch import Dispatcher, Receiver
from kdwatch.slo.engine import Silence
from kdwatch.slo.live import LiveConfig, LiveEngine, receivers_of
from kdwatch.slo.webhooks import new_secret
from kdwatch.storage.slo_store import SloSqlStore
from kdwatch.storage.sql import SqlStore
from tests.integration.receiver import webhook_receiver

MIN = 60_000
T0 = 1_795_000_020_000 - 1_795_000_020_000 % MIN
SLOS = parse_slo_file({
    "slos": [{"name": "agreement", "model": "m", "objective": 0.99, "sli": {"events": {"metric": "agreement"}}}],
    "retrain": [{"model": "m", "when": [{"slo": "agreement"}]}],
})


class Clock:
    def __init__(self, start_s: float) -> None:
        self.now = start_s

    def __call__(self) -> float:
        return self.now


def store_minutes(store: SqlStore, first: int, last: int, incident: tuple[int, int] | None, seed: int = 0) -> None:
    """Closed 1-minute windows [first, last) with 99.5 % agreement, 80 % during the incident."""
    rng = np.random.default_rng(seed + first)
    changes = Changes()
    for i in range(first, last):
        rate = 0.80 if incident and incident[0] <= i < incident[1] else 0.995
        state = WindowState(n=10_000)
        state.fidelity.n_joined = 1000
        state.fidelity.n_agree = int(rng.binomial(1000, rate))
        state.teacher_versions = {"t7": 1000}
        changes.closed[WindowKey("m", "s1", T0 + i * MIN)] = state
    store.commit_batch("g", 0, MIN, changes, {})


_opened: list[LiveEngine] = []


@pytest.fixture(autouse=True)
def _close_engines() -> Iterator[None]:
    yield
    while _opened:
        _opened.pop().close()


def live(store: SqlStore, clock: Clock, alert_url: str | None = None, retrain_url: str | None = None,
         retrain_secret: str | None = None, alertmanager: str | None = None, owner: str = "a",
         group_interval_ms: int | None = None, group_wait_ms: int = 0) -> LiveEngine:
    config = LiveConfig(
        alert_webhook=Receiver("alert-webhook", alert_url, group_interval_ms=group_interval_ms) if alert_url else None,
        retrain_webhook=Receiver("retrain", retrain_url, retrain_secret) if retrain_url else None,
        alertmanager_url=alertmanager, group_wait_ms=group_wait_ms, owner=owner)
    slo_store = SloSqlStore(store.engine)
    client = httpx.Client()
    engine = LiveEngine(SLOS, store, slo_store, Dispatcher(slo_store, receivers_of(config), client, clock=clock), config,
                        clock=clock, client=client)
    _opened.append(engine)
    return engine


def pages(bodies: list[Any], status: str, tier: str = "1h/5m") -> list[Any]:
    return [b for b in bodies if b.get("version") == "4" and b["status"] == status
            and b["alerts"][0]["labels"]["severity"] == "page" and b["alerts"][0]["labels"]["tier"] == tier]


def test_a_page_and_a_signed_retrain_are_delivered_once_and_the_resolution_after(store: SqlStore) -> None:
    secret = new_secret()
    clock = Clock(T0 / 1000 + 4 * 3600)
    with webhook_receiver() as (alert_url, alerts), webhook_receiver(secret) as (retrain_url, retrains):
        engine = live(store, clock, alert_url, retrain_url, secret)
        store_minutes(store, 0, 150, incident=(60, 240))
        engine.run_once()
        firing = pages(alerts.bodies, "firing")
        assert len(firing) == 1
        message = firing[0]
        assert message["groupKey"] == '{}:{model="m"}' and message["receiver"] == "kdwatch"
        alert = message["alerts"][0]
        assert alert["labels"]["tier"] == "1h/5m" and alert["endsAt"] == "0001-01-01T00:00:00Z" and alert["fingerprint"]
        assert [r["verdict"] for r in retrains.requests] == ["ok"]
        retrain = retrains.bodies[0]
        assert retrain["model"] == "m" and retrain["student_version"] == "s1" and retrain["teacher_version"] == "t7"
        assert retrain["trigger"]["reason"] == "slo agreement page" and retrain["trigger"]["agreement"] is not None
        assert retrain["data"]["from"] < retrain["data"]["to"]
        assert retrains.requests[0]["headers"]["webhook-id"] == retrain["webhook_id"]

        engine.run_once()  # nothing new: nothing re-sent
        assert len(alerts.requests) == len(alerts.accepted_ids) and len(retrains.requests) == 1

        store_minutes(store, 150, 300, incident=(60, 240))
        live(store, clock, alert_url, retrain_url, secret).run_once()  # a restarted engine resolves it
        assert len(pages(alerts.bodies, "firing")) == 1
        resolved = pages(alerts.bodies, "resolved")
        assert len(resolved) >= 1 and resolved[0]["alerts"][0]["fingerprint"] == alert["fingerprint"]
        assert len(retrains.requests) == 1


def test_alerts_of_one_model_are_grouped_and_a_group_waits_its_interval(store: SqlStore) -> None:
    clock = Clock(T0 / 1000 + 4 * 3600)
    with webhook_receiver() as (alert_url, alerts):
        engine = live(store, clock, alert_url, group_interval_ms=300_000, group_wait_ms=30_000)
        store_minutes(store, 0, 150, incident=(60, 240))
        engine.run_once()
        assert alerts.requests == []  # group_wait: nothing before 30 s
        clock.now += 31
        engine.dispatcher.deliver_due()
        (first,) = alerts.bodies  # every due alert of model m in one message
        assert len(first["alerts"]) >= 2 and first["groupLabels"] == {"model": "m"}
        assert {a["labels"]["tier"] for a in first["alerts"]} >= {"1h/5m", "6h/30m"}
        store_minutes(store, 150, 300, incident=(60, 240))
        clock.now += 60
        engine.run_once()
        clock.now += 31
        engine.dispatcher.deliver_due()
        assert len(alerts.requests) == 1  # the resolutions wait for the group interval (5 min after the first)
        clock.now += 300
        engine.dispatcher.deliver_due()
        assert len(alerts.requests) == 2 and alerts.bodies[1]["status"] in ("resolved", "firing")
        assert any(a["status"] == "resolved" for a in alerts.bodies[1]["alerts"])


class CrashBeforeDelivery(Exception):
    pass


def test_a_crash_between_trigger_and_delivery_gives_exactly_one_delivery(store: SqlStore) -> None:
    clock = Clock(T0 / 1000 + 4 * 3600)
    with webhook_receiver() as (alert_url, alerts), webhook_receiver() as (retrain_url, retrains):
        first = live(store, clock, alert_url, retrain_url)

        def crash(limit: int = 100) -> int:
            raise CrashBeforeDelivery

        first.dispatcher.deliver_due = crash  # type: ignore[method-assign]
        store_minutes(store, 0, 150, incident=(60, 240))
        with pytest.raises(CrashBeforeDelivery):
            first.run_once()
        assert alerts.requests == [] and retrains.requests == []
        clock.now += 31  # the dead leader's lease runs out
        restarted = live(store, clock, alert_url, retrain_url, owner="b")
        restarted.run_once()
        restarted.run_once()
        assert len(retrains.requests) == 1 and len(pages(alerts.bodies, "firing")) == 1


def test_a_receiver_down_for_a_while_gets_each_delivery_once_with_retries_logged(store: SqlStore) -> None:
    clock = Clock(T0 / 1000 + 4 * 3600)
    with webhook_receiver(script=[(503, {}), (500, {})]) as (retrain_url, retrains):
        engine = live(store, clock, retrain_url=retrain_url)
        store_minutes(store, 0, 150, incident=(60, 240))
        engine.run_once()  # attempt 1: 503
        clock.now += 6
        engine.dispatcher.deliver_due()  # attempt 2 (after ~5 s): 500
        clock.now += 360
        engine.dispatcher.deliver_due()  # attempt 3 (after ~5 min): 200
        clock.now += 100_000
        engine.dispatcher.deliver_due()  # nothing left
        assert [r["status"] for r in retrains.requests] == [503, 500, 200]
        assert len(retrains.accepted_ids) == 1 and len({r["id"] for r in retrains.requests}) == 1
        (delivery,) = SloSqlStore(store.engine).deliveries()
        assert delivery["status"] == "delivered" and [a["status_code"] for a in delivery["log"]] == [503, 500, 200]


def test_a_410_disables_the_receiver_and_a_429_retry_after_is_honoured(store: SqlStore) -> None:
    clock = Clock(T0 / 1000 + 4 * 3600)
    with webhook_receiver(script=[(429, {"Retry-After": "120"})]) as (alert_url, alerts), \
            webhook_receiver(script=[(410, {})]) as (retrain_url, retrains):
        engine = live(store, clock, alert_url, retrain_url)
        store_minutes(store, 0, 150, incident=(60, 240))
        engine.run_once()
        slo_store = SloSqlStore(store.engine)
        assert slo_store.disabled_receivers() == {"retrain"}
        by_receiver = {d["receiver"]: d for d in slo_store.deliveries()}
        assert by_receiver["retrain"]["status"] == "disabled"
        throttled = [d for d in slo_store.deliveries() if d["receiver"] == "alert-webhook" and d["status"] == "pending"]
        assert throttled and throttled[0]["next_attempt_at"] >= clock.now * 1000 + 120_000
        throttled_id = throttled[0]["id"]

        def attempts() -> int:
            return sum(1 for r in alerts.requests if r["id"] == throttled_id)

        clock.now += 60
        engine.dispatcher.deliver_due()
        assert attempts() == 1  # not before Retry-After, although the schedule's next retry is 5 s
        clock.now += 61
        engine.dispatcher.deliver_due()
        assert attempts() == 2 and throttled_id in alerts.accepted_ids
        assert len(retrains.requests) == 1  # the disabled receiver gets nothing more


def test_a_second_trigger_waits_while_a_retrain_is_in_flight(store: SqlStore) -> None:
    slos = parse_slo_file({**SLOS.model_dump(), "retrain": [{"model": "m", "when": [{"slo": "agreement"}], "cooldown": "1m"}]})
    clock = Clock(T0 / 1000 + 12 * 3600)
    with webhook_receiver(script=[(503, {})] * 20) as (retrain_url, retrains):
        engine = live(store, clock, retrain_url=retrain_url)
        engine.slos = slos
        store_minutes(store, 0, 250, incident=(60, 200))
        engine.run_once()
        store_minutes(store, 250, 600, incident=(300, 450))  # a second incident, the first request still undelivered
        engine.run_once()
        assert len({r["id"] for r in retrains.requests}) == 1


class CrashAfterSending(Exception):
    pass


def test_a_crash_after_sending_before_recording_redelivers_with_the_same_webhook_id(store: SqlStore) -> None:
    clock = Clock(T0 / 1000 + 4 * 3600)
    with webhook_receiver() as (retrain_url, retrains):
        first = live(store, clock, retrain_url=retrain_url)

        def crash(*_args: object, **_kwargs: object) -> None:
            raise CrashAfterSending  # the request went out; the process dies before the outbox knows

        first.dispatcher.store.record_attempt = crash  # type: ignore[method-assign]
        store_minutes(store, 0, 150, incident=(60, 240))
        with pytest.raises(CrashAfterSending):
            first.run_once()
        assert len(retrains.requests) == 1
        clock.now += 31  # the dead leader's lease runs out
        restarted = live(store, clock, retrain_url=retrain_url, owner="b")
        restarted.run_once()
        restarted.run_once()
        # At least once: delivered again, under the same webhook-id, which the runner de-duplicates on (one job).
        assert len(retrains.requests) == 2
        assert len({r["id"] for r in retrains.requests}) == 1


def test_two_replicas_cycling_at_the_same_moment_notify_once(store: SqlStore) -> None:
    clock = Clock(T0 / 1000 + 4 * 3600)
    with webhook_receiver() as (retrain_url, retrains):
        replicas = [live(store, clock, retrain_url=retrain_url, owner=name) for name in ("a", "b")]
        store_minutes(store, 0, 150, incident=(60, 240))
        for _cycle in range(5):
            barrier = threading.Barrier(2)
            errors: list[BaseException] = []

            def cycle(engine: LiveEngine, barrier: threading.Barrier = barrier, errors: list[BaseException] = errors) -> None:
                try:
                    barrier.wait(10)
                    engine.run_once()
                except BaseException as exc:  # surfaced below
                    errors.append(exc)

            threads = [threading.Thread(target=cycle, args=(engine,)) for engine in replicas]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert not errors, errors
            clock.now += 60
        assert len(retrains.requests) == 1


def test_two_replicas_never_both_notify(store: SqlStore) -> None:
    clock = Clock(T0 / 1000 + 4 * 3600)
    with webhook_receiver() as (retrain_url, retrains):
        a = live(store, clock, retrain_url=retrain_url, owner="a")
        b = live(store, clock, retrain_url=retrain_url, owner="b")
        store_minutes(store, 0, 150, incident=(60, 240))
        assert b.run_once() != [] and a.run_once() == []
        assert len(retrains.requests) == 1


def test_a_silence_mutes_matching_alerts(store: SqlStore) -> None:
    clock = Clock(T0 / 1000 + 4 * 3600)
    SloSqlStore(store.engine).add_silence(Silence("s1", {"slo": "agreement", "severity": "page"}, T0, T0 + 10 * 3_600_000,
                                                  "oncall", "planned rollout"))
    with webhook_receiver() as (alert_url, alerts):
        store_minutes(store, 0, 150, incident=(60, 240))
        live(store, clock, alert_url).run_once()
        assert pages(alerts.bodies, "firing") == []


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("prometheus-alertmanager")
    assert binary is not None, "installed by `make setup` (Debian package prometheus-alertmanager)"
    home = tmp_path_factory.mktemp("alertmanager")
    (home / "am.yml").write_text("route:\n  receiver: blackhole\nreceivers:\n  - name: blackhole\n")
    port = free_port()
    with (home / "am.log").open("wb") as log:
        proc = subprocess.Popen([binary, f"--config.file={home / 'am.yml'}", f"--storage.path={home}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                                stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with httpx.Client() as client:
                if client.get(url + "/-/ready", timeout=1).status_code == 200:
                    break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError(f"Alertmanager did not start: {(home / 'am.log').read_text()[-2000:]}")
    yield url
    proc.terminate()
    proc.wait(10)


def test_a_firing_alert_is_pushed_into_a_real_alertmanager(store: SqlStore, alertmanager: str, tmp_path: Path) -> None:
    clock = Clock(time.time())
    # Windows ending just now, so Alertmanager sees a current alert (it drops alerts that ended long ago).
    start_min = int(time.time() * 1000 - T0) // MIN - 150
    store_minutes(store, start_min, start_min + 150, incident=(start_min + 60, start_min + 240))
    live(store, clock, alertmanager=alertmanager).run_once()
    with httpx.Client() as client:
        shown = client.get(alertmanager + "/api/v2/alerts", params={"filter": 'alertname="KdwatchSloBurn"'}).json()
    tiers = {(a["labels"]["slo"], a["labels"]["severity"], a["labels"]["tier"]) for a in shown}
    assert ("agreement", "page", "1h/5m") in tiers
    assert all(a["status"]["state"] == "active" for a in shown)
