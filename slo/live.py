"""The live SLO engine: evaluates final windows as they are stored, notifies through the outbox.

One cycle (:meth:`LiveEngine.run_once`):

1. take or renew the leader lease (two replicas never both notify);
2. load the engine's state and event-time progress;
3. evaluate the windows that became final since, in event-time order (stopping at the first window
   still open, so a lagging partition is never skipped);
4. commit the new state together with the notifications it produced (transactional outbox: a crash
   neither loses nor duplicates one);
5. push firing alerts to Alertmanager (re-sent every cycle, endsAt on resolve);
6. deliver what is due (slo.dispatch).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import orjson

from kdwatch.analyzer.drift import Reference
from kdwatch.analyzer.window import WindowState, window_result
from kdwatch.slo.config import SloFile
from kdwatch.slo.dispatch import Dispatcher, Receiver
from kdwatch.slo.engine import Alert, Silence, SloEngine, WindowInput
from kdwatch.slo.notify import alert_entry, alertmanager_api_alerts, alertmanager_webhook_message, outbox_id, retrain_payload
from kdwatch.slo.telemetry import EngineMetrics
from kdwatch.timestamps import rfc3339

log = logging.getLogger(__name__)

ENGINE_NAME = "default"
ALERT_WEBHOOK, RETRAIN = "alert-webhook", "retrain"


class WindowSource(Protocol):
    def windows(self, model: str | None = None, student_version: str | None = None, start_ms: int | None = None,
                end_ms: int | None = None) -> dict[Any, tuple[WindowState, bool, int]]: ...
    def references(self) -> dict[str, Reference]: ...


class EngineStore(Protocol):
    def acquire_lease(self, name: str, owner: str, now_ms: int, ttl_ms: int) -> bool: ...
    def load_engine(self, name: str) -> tuple[dict[str, Any], int]: ...
    def save_engine(self, name: str, owner: str, state: dict[str, Any], evaluated_through: int,
                    deliveries: list[dict[str, Any]]) -> bool: ...
    def silences(self) -> list[Silence]: ...
    def retrains_in_flight(self) -> set[str]: ...
    def pending_backlog(self) -> dict[str, tuple[int, int]]: ...


@dataclass
class LiveConfig:
    alert_webhook: Receiver | None = None
    retrain_webhook: Receiver | None = None
    alertmanager_url: str | None = None
    group_wait_ms: int = 30_000
    lease_ttl_ms: int = 30_000
    external_url: str = ""
    owner: str = field(default_factory=lambda: f"engine-{uuid.uuid4().hex[:12]}")


class LiveEngine:
    def __init__(self, slos: SloFile, windows: WindowSource, store: EngineStore, dispatcher: Dispatcher,
                 config: LiveConfig, clock: Callable[[], float] = time.time, client: httpx.Client | None = None,
                 load_slos: Callable[[], SloFile] | None = None, metrics: EngineMetrics | None = None) -> None:
        self.slos = slos
        self.metrics = metrics
        if metrics is not None:
            dispatcher.on_attempt = metrics.on_attempt
        self.windows = windows
        self.store = store
        self.dispatcher = dispatcher
        self.config = config
        self.clock = clock
        self.client = client or httpx.Client()
        self.notifications: list[dict[str, Any]] = []  # of this process, for the demo's summary
        # When set, SLOs are re-read every cycle (the API edits them in the database).
        self.load_slos = load_slos

    def close(self) -> None:
        self.client.close()
        self.dispatcher.client.close()

    def run_once(self) -> list[dict[str, Any]]:
        """One cycle: evaluate the windows that became final, store alerts and notifications, deliver what is due."""
        if self.metrics is None:
            return self._cycle()[1]
        started = time.monotonic()
        outcome, notes = self._cycle()
        metrics = self.metrics
        metrics.cycle_seconds.observe(time.monotonic() - started)
        metrics.cycles.labels(outcome).inc()
        metrics.leader.set(1.0 if outcome == "led" else 0.0)
        for note in notes:
            kind = str(note.get("type", "other"))
            metrics.notifications.labels(f"{kind}_{note['status']}" if kind == "alert" else kind).inc()
        metrics.on_backlog(self.store.pending_backlog(), int(self.clock() * 1000))
        metrics.last_cycle.set(self.clock())
        return notes

    def _cycle(self) -> tuple[str, list[dict[str, Any]]]:
        now_ms = int(self.clock() * 1000)
        if not self.store.acquire_lease(ENGINE_NAME, self.config.owner, now_ms, self.config.lease_ttl_ms):
            return "follower", []  # another replica leads
        if self.load_slos is not None:
            self.slos = self.load_slos()
        engine = SloEngine(self.slos)
        state, through = self.store.load_engine(ENGINE_NAME)
        engine.load_state(state)
        engine.silences = self.store.silences()
        firing_before = {a.fingerprint: a for a in engine.firing()}
        refs = self.windows.references()
        ready = self._ready_windows(through, refs)
        engine.in_flight = self.store.retrains_in_flight()
        notes: list[dict[str, Any]] = []
        for end in sorted(ready):
            notes.extend(engine.advance(end, ready[end]))
            through = end
        if not ready:
            # No window became final: let the no-data alerts see wall-clock time pass.
            notes.extend(engine.check_no_data(now_ms))
        rows = self._outbox_rows(notes, ready, now_ms, {a.fingerprint: a for a in engine.alerts.values()})
        if not self.store.save_engine(ENGINE_NAME, self.config.owner, engine.state_dict(), through, rows):
            return "lost", []  # lost the lease meanwhile: the new leader redoes this
        self.notifications.extend(notes)
        self._push_alertmanager(engine, firing_before, through)
        self.dispatcher.deliver_due()
        return "led", notes

    def _ready_windows(self, through: int, refs: dict[str, Reference]) -> dict[int, list[WindowInput]]:
        """Windows ending after ``through``, up to (not including) the first end with a window still open."""
        by_end: dict[int, list[WindowInput]] = {}
        open_ends: set[int] = set()
        # A window ending after `through` starts after through - its size (a day at most).
        since = through - 86_400_000 if through else None
        for key, (state, final, window_ms) in self.windows.windows(start_ms=since).items():
            end = key.window_start + window_ms
            if end <= through:
                continue
            if not final:
                open_ends.add(end)
                continue
            result = window_result(key.model, key.student_version, key.window_start, window_ms, state, refs.get(key.model))
            by_end.setdefault(end, []).append(WindowInput(key.model, key.student_version, end, state, result))
        limit = min(open_ends) if open_ends else None
        return {end: inputs for end, inputs in by_end.items() if limit is None or end < limit}

    def _outbox_rows(self, notes: list[dict[str, Any]], ready: dict[int, list[WindowInput]], now_ms: int,
                     alerts: dict[str, Alert]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        due = now_ms + self.config.group_wait_ms
        for note in notes:
            if note["type"] == "alert" and self.config.alert_webhook is not None:
                alert = alerts.get(note["fingerprint"])
                started = alert.started_at if alert is not None and alert.started_at is not None else None
                entry = alert_entry(note, note["at"] if started is None else rfc3339(started), self.config.external_url)
                message = alertmanager_webhook_message([entry], note["model"], external_url=self.config.external_url)
                rows.append(self._row(outbox_id(ALERT_WEBHOOK, note["fingerprint"], note["status"], note["at"]),
                                      ALERT_WEBHOOK, note["model"], message, now_ms, due))
            elif note["type"] == "retrain" and self.config.retrain_webhook is not None:
                versions = [w for ws in ready.values() for w in ws if w.model == note["model"]]
                latest = max(versions, key=lambda w: w.end_ms) if versions else None
                at_ms = max(ready) if ready else now_ms
                numbers = {k: latest.result.get(k) for k in ("agreement", "kl_mean", "ece", "accuracy_delta")} if latest else {}
                teachers: dict[str, int] = {}
                for w in versions:
                    for version, count in w.state.teacher_versions.items():
                        teachers[version] = teachers.get(version, 0) + count
                teacher = max(teachers, key=lambda v: teachers[v]) if teachers else None
                payload = retrain_payload(note, latest.student_version if latest else None, teacher,
                                          at_ms - 6 * 3_600_000, at_ms, numbers)
                rows.append(self._row(note["webhook_id"], RETRAIN, note["model"], payload, now_ms, now_ms))
        return rows

    @staticmethod
    def _row(row_id: str, receiver: str, group: str, payload: dict[str, Any], now_ms: int, due_ms: int) -> dict[str, Any]:
        return {"id": row_id, "receiver": receiver, "group_key": group, "payload": orjson.dumps(payload).decode(),
                "status": "pending", "attempts": 0, "next_attempt_at": due_ms, "created_at": now_ms,
                "last_status_code": None, "last_error": None}

    def _push_alertmanager(self, engine: SloEngine, firing_before: dict[str, Alert], through: int) -> None:
        if self.config.alertmanager_url is None:
            return
        firing = engine.firing()
        now_firing = {a.fingerprint for a in firing}
        resolved = [(a, through) for fp, a in firing_before.items() if fp not in now_firing]
        body = alertmanager_api_alerts(firing, resolved)
        if not body:
            return
        try:
            response = self.client.post(self.config.alertmanager_url.rstrip("/") + "/api/v2/alerts", json=body, timeout=10)
            if response.status_code >= 300:
                log.warning("Alertmanager answered %d: %s", response.status_code, response.text[:300])
        except httpx.HTTPError as exc:
            log.warning("Alertmanager unreachable (%s); firing alerts are re-sent next cycle", exc)


def receivers_of(config: LiveConfig) -> dict[str, Receiver]:
    out = {}
    if config.alert_webhook is not None:
        out[ALERT_WEBHOOK] = config.alert_webhook
    if config.retrain_webhook is not None:
        out[RETRAIN] = config.retrain_webhook
    return out
