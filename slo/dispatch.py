"""Deliver the outbox: signed HTTP POSTs with retries, backoff and jitter, and a delivery log.

Follows the Standard Webhooks delivery rules: 2xx is success; 410 Gone disables the receiver;
429, 502 and 504 mean "slow down" and a ``Retry-After`` is honoured; anything else (and a network
error) is retried on the spec's schedule (immediately, 5s, 5m, 30m, 2h, 5h, 10h, 14h, 20h, 24h)
with ±20 % jitter, then marked failed. The ``webhook-id`` stays the same on every attempt, so the
receiver can de-duplicate: delivery is at-least-once, the effect exactly-once.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import httpx
import orjson

from kdwatch.slo import webhooks

log = logging.getLogger(__name__)

RETRY_SCHEDULE_S = (0, 5, 300, 1_800, 7_200, 18_000, 36_000, 50_400, 72_000, 86_400)
JITTER = 0.2
SLOW_DOWN = {429, 502, 504}


@dataclass(frozen=True)
class Receiver:
    name: str
    url: str
    secret: str | None = None  # whsec_...: sign deliveries (Standard Webhooks)
    timeout_s: float = 10.0
    # Alertmanager-style grouping: due notifications of one group go out as one message, and a
    # group is notified at most once per group_interval. None: every notification on its own.
    group_interval_ms: int | None = None


@dataclass
class Delivery:
    id: str
    receiver: str
    payload: bytes
    attempts: int
    group_key: str = ""
    members: tuple[str, ...] = ()  # outbox ids a grouped message carries (empty: just ``id``)


class DeliveryStore(Protocol):
    def due_deliveries(self, now_ms: int, limit: int) -> list[Delivery]: ...
    def record_attempt(self, delivery_id: str, attempt: int, now_ms: int, status_code: int | None, error: str | None,
                       duration_ms: int, status: str, next_attempt_at: int) -> None: ...
    def disable_receiver(self, receiver: str, now_ms: int, reason: str) -> None: ...
    def disabled_receivers(self) -> set[str]: ...
    def last_delivered_at(self, receiver: str, group_key: str) -> int | None: ...
    def postpone(self, delivery_ids: list[str], until_ms: int) -> None: ...


def retry_after_s(header: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not header:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(header).timestamp() - now)
        except (TypeError, ValueError):
            return None


def next_delay_s(attempt: int, rng: random.Random) -> float | None:
    """Delay before attempt number ``attempt + 1`` (1-based attempts made so far), None when exhausted."""
    if attempt >= len(RETRY_SCHEDULE_S):
        return None
    base = RETRY_SCHEDULE_S[attempt]
    return base * (1 + rng.uniform(-JITTER, JITTER))


class Dispatcher:
    def __init__(self, store: DeliveryStore, receivers: dict[str, Receiver], client: httpx.Client | None = None,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None) -> None:
        self.store = store
        self.receivers = receivers
        self.client = client or httpx.Client()
        self.clock = clock
        self.rng = rng or random.Random()
        # Told of every attempt: (receiver, outcome, seconds); kdwatch.slo.telemetry counts them.
        self.on_attempt: Callable[[str, str, float], None] | None = None

    def deliver_due(self, limit: int = 100) -> int:
        """Attempt every due delivery once; returns how many were attempted."""
        now = self.clock()
        now_ms = int(now * 1000)
        disabled = self.store.disabled_receivers()
        due = self.store.due_deliveries(now_ms, limit)
        for delivery in self._grouped(due, now_ms):
            receiver = self.receivers.get(delivery.receiver)
            if receiver is None or delivery.receiver in disabled:
                why = "disabled (it answered 410)" if delivery.receiver in disabled else "not configured"
                status = "disabled" if delivery.receiver in disabled else "failed"
                for member in delivery.members or (delivery.id,):
                    self.store.record_attempt(member, delivery.attempts, now_ms, None,
                                              f"receiver {delivery.receiver} is {why}", 0, status, 0)
                if self.on_attempt is not None:
                    self.on_attempt(delivery.receiver, status, 0.0)
                continue
            self._attempt(receiver, delivery)
        return len(due)

    def _grouped(self, due: list[Delivery], now_ms: int) -> list[Delivery]:
        """Merge due Alertmanager-format notifications of one (receiver, group) into one message."""
        out: list[Delivery] = []
        groups: dict[tuple[str, str], list[Delivery]] = {}
        for delivery in due:
            receiver = self.receivers.get(delivery.receiver)
            if receiver is None or receiver.group_interval_ms is None:
                out.append(delivery)
            else:
                groups.setdefault((delivery.receiver, delivery.group_key), []).append(delivery)
        for (name, group_key), members in groups.items():
            interval = self.receivers[name].group_interval_ms or 0
            last = self.store.last_delivered_at(name, group_key)
            if last is not None and now_ms - last < interval:
                self.store.postpone([m.id for m in members], last + interval)
                continue
            messages = [orjson.loads(m.payload) for m in members]
            merged = dict(messages[-1])
            merged["alerts"] = [a for message in messages for a in message["alerts"]]
            merged["status"] = "firing" if any(a["status"] == "firing" for a in merged["alerts"]) else "resolved"
            ids = tuple(sorted(m.id for m in members))
            group_id = ids[0] if len(ids) == 1 else "msg_" + hashlib.sha256("|".join(ids).encode()).hexdigest()[:32]
            out.append(Delivery(group_id, name, orjson.dumps(merged), max(m.attempts for m in members), group_key, ids))
        return out

    def _record(self, delivery: Delivery, attempt: int, now_ms: int, status_code: int | None, error: str | None,
                duration_ms: int, status: str, next_attempt_at: int) -> None:
        for member in delivery.members or (delivery.id,):
            self.store.record_attempt(member, attempt, now_ms, status_code, error, duration_ms, status, next_attempt_at)
        if self.on_attempt is not None:
            self.on_attempt(delivery.receiver, status, duration_ms / 1000)

    def _attempt(self, receiver: Receiver, delivery: Delivery) -> None:
        attempt = delivery.attempts + 1
        now = self.clock()
        headers = {"content-type": "application/json", "webhook-id": delivery.id}
        if receiver.secret is not None:
            # The signed timestamp is the real sending time (receivers check it against their clock).
            headers = webhooks.headers(receiver.secret, delivery.id, delivery.payload, int(time.time()))
        started = time.monotonic()
        status_code: int | None = None
        error: str | None = None
        retry_hint: float | None = None
        try:
            response = self.client.post(receiver.url, content=delivery.payload, headers=headers, timeout=receiver.timeout_s)
            status_code = response.status_code
            retry_hint = retry_after_s(response.headers.get("retry-after"), now)
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        duration_ms = int((time.monotonic() - started) * 1000)
        now_ms = int(self.clock() * 1000)
        if status_code is not None and 200 <= status_code < 300:
            self._record(delivery, attempt, now_ms, status_code, None, duration_ms, "delivered", 0)
            return
        if status_code == 410:
            self._record(delivery, attempt, now_ms, status_code, "410 Gone: receiver disabled", duration_ms,
                                      "disabled", 0)
            self.store.disable_receiver(receiver.name, now_ms, f"answered 410 to {delivery.id}")
            log.warning("receiver %s answered 410 Gone: disabled", receiver.name)
            return
        delay = next_delay_s(attempt, self.rng)
        if status_code in SLOW_DOWN and retry_hint is not None:
            delay = max(delay or 0.0, retry_hint) if delay is not None else None
        if error is None:
            error = f"HTTP {status_code}"
        if delay is None:
            self._record(delivery, attempt, now_ms, status_code, error, duration_ms, "failed", 0)
            log.warning("delivery %s to %s failed for good after %d attempts", delivery.id, receiver.name, attempt)
            return
        self._record(delivery, attempt, now_ms, status_code, error, duration_ms, "pending",
                                  now_ms + int(delay * 1000))


def encode(payload: dict[str, Any]) -> bytes:
    return orjson.dumps(payload)
