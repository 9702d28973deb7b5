"""The live SLO engine's own metrics (README "Self-metrics"), served by ``kdwatch engine --metrics-port``.

A cycle reads the final windows, evaluates the SLOs, writes alerts and notifications in one
transaction and delivers what is due. These say how long that takes, when it last ran, whether this
replica leads, and what became of each delivery attempt.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

CYCLE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.cycle_seconds = Histogram("kdwatch_engine_cycle_duration_seconds", "One evaluation cycle (read windows, "
                                       "evaluate, store, deliver)", buckets=CYCLE_BUCKETS, registry=registry)
        self.last_cycle = Gauge("kdwatch_engine_last_cycle_timestamp_seconds", "When this replica last finished a cycle "
                                "(epoch seconds)", registry=registry)
        self.cycles = Counter("kdwatch_engine_cycles", "Cycles per outcome: led (evaluated), follower (another replica "
                              "holds the lease), lost (the lease moved during the cycle)", ["outcome"], registry=registry)
        self.leader = Gauge("kdwatch_engine_leader", "1 while this replica holds the leader lease", registry=registry)
        self.notifications = Counter("kdwatch_engine_notifications", "Notification lines produced per kind (alert_firing, "
                                     "alert_resolved, retrain, ...)", ["kind"], registry=registry)
        self.deliveries = Counter("kdwatch_engine_deliveries", "Delivery attempts per receiver and outcome (delivered, "
                                  "pending: will retry, failed, disabled)", ["receiver", "outcome"], registry=registry)
        self.delivery_seconds = Histogram("kdwatch_engine_delivery_duration_seconds", "One HTTP delivery attempt",
                                          ["receiver"], registry=registry)
        self.pending = Gauge("kdwatch_engine_outbox_pending", "Notifications waiting in the outbox, per receiver",
                             ["receiver"], registry=registry)
        self.oldest_age = Gauge("kdwatch_engine_outbox_oldest_age_seconds", "Age of the oldest notification waiting in "
                                "the outbox, per receiver", ["receiver"], registry=registry)

    def on_attempt(self, receiver: str, outcome: str, seconds: float) -> None:
        self.deliveries.labels(receiver, outcome).inc()
        if seconds > 0:
            self.delivery_seconds.labels(receiver).observe(seconds)

    def on_backlog(self, backlog: dict[str, tuple[int, int]], now_ms: int) -> None:
        """Set the outbox gauges from (pending, oldest created_at ms) per receiver; receivers with none read 0."""
        for receiver in {labels[0] for labels in _label_sets(self.pending)} - set(backlog):
            self.pending.labels(receiver).set(0)
            self.oldest_age.labels(receiver).set(0)
        for receiver, (count, oldest_ms) in backlog.items():
            self.pending.labels(receiver).set(count)
            self.oldest_age.labels(receiver).set(max(now_ms - oldest_ms, 0) / 1000)


def _label_sets(gauge: Gauge) -> list[tuple[str, ...]]:
    return [tuple(sample.labels.values()) for metric in gauge.collect() for sample in metric.samples]
