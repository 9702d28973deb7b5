"""Consumer lag: the brokers' log-end offsets minus the offsets kdwatch stored (its source of truth).

A scrape never waits on Kafka: :class:`LagSource` refreshes the lag on a background thread, every
``interval_s``, with Kafka's own request timeout bounding each attempt, and a scrape serves the last
values it got, with when it got them and how many refreshes failed. While the broker is down (or a
topic whose offsets were stored is gone) the scrape still answers at once; the series carry the age
of their values and ``kdwatch_consumer_lag_refresh_failures_total`` counts the failures, which the
shipped rules alert on (lag unknown).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from kdwatch.storage.sql import SqlStore

log = logging.getLogger(__name__)

REFRESH_INTERVAL_S = 10.0
KAFKA_TIMEOUT_MS = 5_000  # one refresh's requests; a dead broker costs the refresh thread this, never a scrape
READINESS_TIMEOUT_S = 3.0  # /readyz answers within this (plus the database check)


@dataclass
class LagSnapshot:
    """The lag as last refreshed: per (group, topic, partition), and when and how the refreshes went."""

    lag: dict[tuple[str, str, int], int] = field(default_factory=dict)
    last_success_s: float | None = None  # epoch seconds of the last refresh that reached the broker
    failures: int = 0  # refreshes that failed since the process started


class LagSource:
    """Callable: the last lag values (no I/O); ``start()`` begins the background refresh."""

    def __init__(self, bootstrap_servers: str, store: SqlStore, options: dict[str, Any] | None = None,
                 interval_s: float = REFRESH_INTERVAL_S, timeout_ms: int = KAFKA_TIMEOUT_MS) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.store = store
        self.options = options or {}
        self.interval_s = interval_s
        self.timeout_ms = timeout_ms
        self._snapshot = LagSnapshot()
        self._lock = threading.Lock()
        self._consumer: KafkaConsumer | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self) -> dict[tuple[str, str, int], int]:
        return dict(self.snapshot().lag)

    def snapshot(self) -> LagSnapshot:
        with self._lock:
            return LagSnapshot(dict(self._snapshot.lag), self._snapshot.last_success_s, self._snapshot.failures)

    def start(self) -> LagSource:
        """Refresh now and every ``interval_s`` on a daemon thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kdwatch-lag", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the background refresh (a refresh under way finishes first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.interval_s)

    def refresh(self) -> bool:
        """One refresh: True when the broker answered (the values are then current)."""
        try:
            stored = self.store.offsets()
            ends = self._end_offsets(sorted({TopicPartition(t, p) for _g, t, p in stored})) if stored else {}
            missing = {TopicPartition(t, p) for _g, t, p in stored} - set(ends)
            if missing:
                raise KafkaError(f"no log-end offset for {len(missing)} stored partitions (topics deleted?)")
        except Exception as exc:  # any failure: keep the last values, count it, say why once per failure
            log.warning("consumer lag refresh failed: %s: %s", type(exc).__name__, exc)
            self._reset_consumer()
            with self._lock:
                self._snapshot.failures += 1
            return False
        lag = {(g, t, p): max(ends[TopicPartition(t, p)] - o, 0) for (g, t, p), o in stored.items()}
        with self._lock:
            self._snapshot.lag = lag
            self._snapshot.last_success_s = time.time()
        return True

    def _end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        if self._consumer is None:
            self._consumer = KafkaConsumer(bootstrap_servers=self.bootstrap_servers, enable_auto_commit=False,
                                           request_timeout_ms=self.timeout_ms, bootstrap_timeout_ms=self.timeout_ms,
                                           **self.options)
        ends: dict[TopicPartition, int] = self._consumer.end_offsets(partitions)
        return ends

    def _reset_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                consumer.close(autocommit=False)
            except Exception as exc:  # a consumer of a dead broker may fail to close; it is dropped either way
                log.debug("closing the lag consumer: %s", exc)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)  # a daemon thread: one stuck on a dead broker is left behind
        self._reset_consumer()


def lag_source(bootstrap_servers: str, store: SqlStore, options: dict[str, Any] | None = None) -> LagSource:
    """A started lag source (the API serves its values in /metrics)."""
    return LagSource(bootstrap_servers, store, options).start()


def kafka_readiness(bootstrap_servers: str, options: dict[str, Any] | None = None,
                    timeout_s: float = READINESS_TIMEOUT_S) -> Callable[[], dict[str, str]]:
    """A /readyz check: can an admin client list topics, within ``timeout_s``?"""
    from kafka import KafkaAdminClient

    def probe() -> None:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=int(timeout_s * 1000),
                                 bootstrap_timeout_ms=int(timeout_s * 1000), **(options or {}))
        try:
            admin.list_topics()
        finally:
            admin.close()

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="kdwatch-readyz")

    def check() -> dict[str, str]:
        future = pool.submit(probe)
        try:
            future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            return {"kafka": f"unavailable: no answer within {timeout_s:g} s"}
        except (KafkaError, OSError) as exc:
            return {"kafka": f"unavailable: {type(exc).__name__}"}
        return {"kafka": "ok"}

    return check
