"""The collector's own metrics (README "Self-metrics"), served by ``kdwatch collect --metrics-port``.

They describe this process: what it read and processed, how long a poll's work took, when it last
committed, and per owned co-partition its join buffer, its queues and its watermark. The API's
``/metrics`` reports the pipeline as the database sees it (committed offsets, counters): that view
survives a dead collector, this one says why a live one is slow or stuck.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# A poll's work: decode, merge, join, one transaction per co-partition. Buckets from 5 ms to a minute.
BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class CollectorMetrics:
    """Instruments on ``registry``; the collector calls the ``on_*`` methods."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.records = Counter("kdwatch_collector_records", "Offsets processed (in merge order), per topic",
                               ["topic"], registry=registry)
        self.events = Counter("kdwatch_collector_events", "Records processed per kind and outcome (valid, or the "
                              "rejection, late, unmatched or duplicate reason)", ["kind", "outcome"], registry=registry)
        self.dead_letters = Counter("kdwatch_collector_dead_letters", "Records sent to a dead-letter topic, per reason",
                                    ["topic", "reason"], registry=registry)
        self.batch_seconds = Histogram("kdwatch_collector_batch_duration_seconds",
                                       "One poll's work: queue, merge, join and commit every owned co-partition",
                                       buckets=BATCH_BUCKETS, registry=registry)
        self.last_commit = Gauge("kdwatch_collector_last_commit_timestamp_seconds",
                                 "When this collector last committed a batch to the database (epoch seconds)",
                                 registry=registry)
        self.windows_closed = Counter("kdwatch_collector_windows_closed", "Windows made final", registry=registry)
        self.buffered = Gauge("kdwatch_collector_join_buffer_entries",
                              "Predictions, replays and labels held in the join buffer, per co-partition",
                              ["partition"], registry=registry)
        self.queued = Gauge("kdwatch_collector_queued_records", "Records fetched and waiting in the event-time merge",
                            ["partition", "input"], registry=registry)
        self.input_time = Gauge("kdwatch_collector_input_event_time_seconds",
                                "Highest event time processed per input of a co-partition (epoch seconds)",
                                ["partition", "input"], registry=registry)
        self.input_idle = Gauge("kdwatch_collector_input_idle", "1 while an input no longer holds the watermark back "
                                "(nothing queued, at its end, for the idle timeout)", ["partition", "input"], registry=registry)
        self.watermark = Gauge("kdwatch_collector_watermark_timestamp_seconds",
                               "Event-time watermark per co-partition (epoch seconds)", ["partition"], registry=registry)
        self.owned = Gauge("kdwatch_collector_partitions_owned", "Co-partitions this member owns", registry=registry)
        self.reopens = Counter("kdwatch_collector_consumer_reopens", "Kafka consumers replaced because the client "
                               "stopped returning a partition it had records for", registry=registry)
        # Kept for dashboards and alerts that name it: always 0 since the collector has one engine.
        self.handovers = Counter("kdwatch_collector_engine_handovers", "Co-partitions moved to another engine "
                                 "(always 0: the collector has one engine)", registry=registry)
        self.pauses = Counter("kdwatch_collector_outages", "Pauses for an unavailable database or broker",
                              ["dependency"], registry=registry)

    def on_processed(self, counts: dict[str, int]) -> None:
        for topic, n in counts.items():
            if n:
                self.records.labels(topic).inc(n)

    def on_commit(self, counters: dict[tuple[str, str], int], dead: Iterable[tuple[str, str]], closed: int, now_s: float) -> None:
        for (kind, outcome), n in counters.items():
            self.events.labels(kind, outcome).inc(n)
        for topic, reason in dead:
            self.dead_letters.labels(topic, reason).inc()
        if closed:
            self.windows_closed.inc(closed)
        self.last_commit.set(now_s)

    def on_unit(self, partition: int, buffered: int, watermark_ms: int | None, queued: dict[str, int],
                observed: dict[str, int], idle: dict[str, bool]) -> None:
        p = str(partition)
        self.buffered.labels(p).set(buffered)
        if watermark_ms is not None:
            self.watermark.labels(p).set(watermark_ms / 1000)
        for kind, n in queued.items():
            self.queued.labels(p, kind).set(n)
            self.input_idle.labels(p, kind).set(1.0 if idle.get(kind) else 0.0)
            if kind in observed:
                self.input_time.labels(p, kind).set(observed[kind] / 1000)

    def on_revoked(self, partition: int, inputs: Iterable[str]) -> None:
        """Forget a co-partition this member no longer owns (another member reports it now)."""
        p = str(partition)
        families: list[Any] = [self.buffered, self.watermark]
        for family in families:
            _remove(family, p)
        for kind in inputs:
            for family in (self.queued, self.input_time, self.input_idle):
                _remove(family, p, kind)


def _remove(family: Any, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never set for this co-partition: nothing to forget
        family.remove(*labels)
