"""Consumer lag: the brokers' log-end offsets minus the offsets kdwatch stored (its source of truth)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from kdwatch.storage.sql import SqlStore


class LagSource:
    """Callable: lag per (group, topic, partition), from one consumer (no group) reused across scrapes."""

    def __init__(self, bootstrap_servers: str, store: SqlStore, options: dict[str, Any] | None = None) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.store = store
        self.options = options or {}
        self._lock = threading.Lock()
        self._consumer: KafkaConsumer | None = None

    def __call__(self) -> dict[tuple[str, str, int], int]:
        stored = self.store.offsets()
        if not stored:
            return {}
        with self._lock:
            try:
                if self._consumer is None:
                    self._consumer = KafkaConsumer(bootstrap_servers=self.bootstrap_servers, enable_auto_commit=False,
                                                   **self.options)
                ends = self._consumer.end_offsets(sorted({TopicPartition(t, p) for _g, t, p in stored}))
            except KafkaError:
                return {}  # the broker is unreachable: /readyz says so; no lag rather than a wrong one
        return {(g, t, p): max(ends.get(TopicPartition(t, p), o) - o, 0) for (g, t, p), o in stored.items()}

    def close(self) -> None:
        with self._lock:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None


def lag_source(bootstrap_servers: str, store: SqlStore, options: dict[str, Any] | None = None) -> LagSource:
    return LagSource(bootstrap_servers, store, options)


def kafka_readiness(bootstrap_servers: str, options: dict[str, Any] | None = None) -> Callable[[], dict[str, str]]:
    """A /readyz check: can an admin client list topics?"""
    from kafka import KafkaAdminClient

    def check() -> dict[str, str]:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=3000, **(options or {}))
            try:
                admin.list_topics()
            finally:
                admin.close()
        except (KafkaError, OSError) as exc:
            return {"kafka": f"unavailable: {type(exc).__name__}"}
        return {"kafka": "ok"}

    return check
