"""Prometheus metrics, read from the database at scrape time (a custom collector on a passed-in registry).

Metric names are a public interface (README "Prometheus metrics"); labels are bounded: per model and
version for the latest final window, features capped at ``max_features``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kdwatch.analyzer.window import window_result
from kdwatch.collector.records import DEAD_LETTER_REASONS, INPUTS
from kdwatch.durations import format_duration_ms
from kdwatch.slo.burn import budget_remaining, burn_rate
from kdwatch.slo.config import parse_slo_file
from kdwatch.slo.engine import SloEngine
from kdwatch.storage.jobs import JobStore
from kdwatch.storage.slo_store import SloSqlStore
from kdwatch.storage.sql import SqlStore

WINDOW_GAUGES = {
    "agreement": "Top-1 agreement of student and teacher over joined events",
    "kl_mean": "Mean KL(teacher||student), nats",
    "kl_p95": "95th percentile of per-event KL, nats",
    "js_mean": "Mean Jensen-Shannon divergence, nats",
    "ece": "Expected calibration error of the student (15 bins)",
    "ece_teacher": "Expected calibration error of the teacher",
    "accuracy_student": "Student accuracy over labelled events",
    "accuracy_delta": "Student minus teacher accuracy over events with label and replay",
    "teacher_sample_rate": "Share of predictions with a teacher replay",
    # generative (language-model) students
    "token_agreement": "Share of the student's tokens that are the teacher's top-1 token",
    "seq_agreement": "Share of joined sequences agreeing with the teacher at every token",
    "teacher_ppl": "Teacher perplexity of the student's tokens (exp of the mean teacher NLL)",
    "teacher_nll_mean": "Mean teacher negative log-likelihood per student token, nats",
    "student_nll_mean": "Mean student negative log-likelihood per token, nats",
    "kl_rev_mean": "Per-token reverse KL(student||teacher) on the student's samples (k1 estimator), nats",
    "kl_rev_k3_mean": "Per-token reverse KL, non-negative k3 estimator, nats",
    "len_mean": "Mean generated length, tokens",
}


class KdwatchCollector(Collector):
    def __init__(self, store: SqlStore, slo_store: SloSqlStore, max_features: int = 50,
                 lag: Callable[[], dict[tuple[str, str, int], int]] | None = None) -> None:
        self.store = store
        self.slo_store = slo_store
        self.max_features = max_features
        self.lag = lag  # (group, topic, partition) -> records not yet consumed
        self.jobs = JobStore(store.engine)
        # What a scrape reports of the stored windows, kept between scrapes: each scrape reads only the windows
        # written since the previous one (reading a month of windows took 4.6 s per scrape).
        # (model, version, window start) -> (final, agreeing, joined, correct, labelled, agreeing tokens, tokens)
        self._sli_per_window: dict[tuple[str, str, int], tuple[bool, int, int, int, int, int, int]] = {}
        self._latest_final: dict[tuple[str, str], tuple[Any, Any, int]] = {}  # (model, version) -> (key, state, window_ms)
        self._versions: dict[tuple[str, str, int], tuple[int, int]] = {}  # window -> (rows, newest write) as folded in
        self._seen_ms = 0  # the newest window write folded in

    def collect(self) -> Iterator[Any]:
        if self.lag is not None:
            yield from self._lag()
        self._fold_window_changes()
        yield from self._sli_counters()
        yield from self._windows()
        yield from self._counters()
        yield from self._slos()
        yield from self._pipeline()

    def _fold_window_changes(self) -> None:
        """Fold the windows written since the last scrape into the per-window SLI counts and the latest final windows.

        Writes from the last 5 s before the newest one seen are read again: a writer whose clock lags ours
        by less than that is never missed (a window read twice replaces its own entry).
        """
        versions = self.store.window_versions_since(self._seen_ms - 5_000)
        moved = [key for key, version in versions.items() if self._versions.get(tuple(key)) != version]  # type: ignore[arg-type]
        self._versions.update({(k.model, k.student_version, k.window_start): v for k, v in versions.items()})
        self._seen_ms = max([self._seen_ms, *(newest for _rows, newest in versions.values())])
        for key, (state, final, window_ms) in self.store.windows_of(moved).items():
            # Plain tuples of atoms: the garbage collector untracks them (a month of windows adds no GC work).
            self._sli_per_window[(key.model, key.student_version, key.window_start)] = (
                final, state.fidelity.n_agree, state.fidelity.n_joined, sum(state.calibration.correct), state.calibration.n,
                state.generative.n_tokens_agree, state.generative.n_tokens)
            if final:
                current = self._latest_final.get((key.model, key.student_version))
                if current is None or current[0].window_start <= key.window_start:
                    self._latest_final[(key.model, key.student_version)] = (key, state, window_ms)

    def _lag(self) -> Iterator[Any]:
        """The consumer lag as last refreshed in the background (kdwatch.lag): a scrape never waits on Kafka."""
        assert self.lag is not None
        snapshot = getattr(self.lag, "snapshot", None)
        lags = snapshot().lag if snapshot is not None else self.lag()
        family = GaugeMetricFamily("kdwatch_consumer_lag", "Records not yet consumed per partition (log end - stored offset)",
                                   labels=["group", "topic", "partition"])
        for (group, topic, partition), lag in sorted(lags.items()):
            family.add_metric([group, topic, str(partition)], float(lag))
        yield family
        if snapshot is None:
            return
        state = snapshot()
        success = GaugeMetricFamily("kdwatch_consumer_lag_last_success_timestamp_seconds",
                                    "When the consumer lag was last read from the brokers (epoch seconds; 0: never)")
        success.add_metric([], state.last_success_s or 0.0)
        yield success
        failures = CounterMetricFamily("kdwatch_consumer_lag_refresh_failures",
                                       "Background consumer-lag refreshes that failed (broker unreachable, topic missing)")
        failures.add_metric([], float(state.failures))
        yield failures

    def _windows(self) -> Iterator[Any]:
        latest = self._latest_final
        refs = self.store.references()
        gauges = {name: GaugeMetricFamily(f"kdwatch_window_{name}", help_, labels=["model", "student_version"])
                  for name, help_ in WINDOW_GAUGES.items()}
        events = GaugeMetricFamily("kdwatch_window_events", "Predictions in the latest final window", labels=["model", "student_version"])
        psi = GaugeMetricFamily("kdwatch_window_psi", "PSI against the reference, per feature",
                                labels=["model", "student_version", "feature"])
        mia_auc = GaugeMetricFamily("kdwatch_window_mia_auc", "Loss-attack AUC of membership inference",
                                    labels=["model", "student_version"])
        mia_tpr = GaugeMetricFamily("kdwatch_window_mia_tpr_at_1pct_fpr", "Loss-attack TPR at 1% FPR",
                                    labels=["model", "student_version"])
        latency = GaugeMetricFamily("kdwatch_window_latency_ms", "Prediction latency quantiles, ms",
                                    labels=["model", "student_version", "quantile"])
        end = GaugeMetricFamily("kdwatch_window_end_timestamp_seconds", "End of the latest final window",
                                labels=["model", "student_version"])
        seg_events = GaugeMetricFamily("kdwatch_window_segment_events", "Predictions per segment",
                                       labels=["model", "student_version", "segment"])
        seg_agreement = GaugeMetricFamily("kdwatch_window_segment_agreement", "Agreement per segment",
                                          labels=["model", "student_version", "segment"])
        reliability = GaugeMetricFamily("kdwatch_window_reliability_accuracy",
                                        "Student accuracy per confidence bin (upper edge le) over labelled events",
                                        labels=["model", "student_version", "le"])
        confidence = GaugeMetricFamily("kdwatch_window_confidence_share",
                                       "Share of predictions per top-1 confidence bin (reference decile edges, upper edge le)",
                                       labels=["model", "student_version", "le"])
        for (model, version), (key, state, window_ms) in sorted(latest.items()):
            result = window_result(model, version, key.window_start, window_ms, state, refs.get(model))
            labels = [model, version]
            for name, family in gauges.items():
                if result.get(name) is not None:
                    family.add_metric(labels, float(result[name]))
            events.add_metric(labels, float(result["n"]))
            end.add_metric(labels, (key.window_start + window_ms) / 1000)
            for feature, value in sorted((result.get("psi") or {}).items())[: self.max_features]:
                if value is not None:
                    psi.add_metric([*labels, feature], float(value))
            mia = result.get("mia") or {}
            if mia.get("auc") is not None:
                mia_auc.add_metric(labels, float(mia["auc"]))
                mia_tpr.add_metric(labels, float(mia["tpr_at_1pct_fpr"]))
            top = sorted(result["segments"].items(), key=lambda kv: -kv[1]["n"])[: self.max_features]
            for segment, seg in top:
                seg_events.add_metric([*labels, segment], float(seg["n"]))
                if seg["agreement"] is not None:
                    seg_agreement.add_metric([*labels, segment], float(seg["agreement"]))
            for b in state.calibration.reliability():
                reliability.add_metric([*labels, f"{b['high']:.4f}"], float(b["accuracy"]))
            ref = refs.get(model)
            counts = state.drift.counts.get("_confidence")
            if ref is not None and counts and "_confidence" in ref.features and sum(counts):
                edges = [*(ref.features["_confidence"].edges or ()), float("inf")]
                for upper, count in zip(edges, counts, strict=True):
                    confidence.add_metric([*labels, "+Inf" if upper == float("inf") else f"{upper:.4f}"], count / sum(counts))
            for q, field in (("0.5", "latency_p50_ms"), ("0.95", "latency_p95_ms"), ("0.99", "latency_p99_ms")):
                if result.get(field) is not None:
                    latency.add_metric([*labels, q], float(result[field]))
        yield from gauges.values()
        yield from (events, psi, mia_auc, mia_tpr, latency, end, seg_events, seg_agreement, reliability, confidence)

    def _sli_counters(self) -> Iterator[Any]:
        """Good and bad events of the counter SLIs over every final window (for Prometheus-native burn rates)."""
        family = CounterMetricFamily("kdwatch_sli_events", "Events of the agreement, accuracy and token_agreement SLIs "
                                     "in final windows", labels=["model", "student_version", "sli", "outcome"])
        totals: dict[tuple[str, str, str, str], int] = {}
        for (model, version, _start), (final, agree, joined, correct, labelled, tokens_agree, tokens) in self._sli_per_window.items():
            if not final:
                continue
            for sli, good, total in (("agreement", agree, joined), ("accuracy", correct, labelled),
                                     ("token_agreement", tokens_agree, tokens)):
                if sli == "token_agreement" and not tokens:
                    continue  # a classifier's windows: no token series
                for outcome, count in (("good", good), ("bad", total - good)):
                    k = (model, version, sli, outcome)
                    totals[k] = totals.get(k, 0) + count
        for labels, count in sorted(totals.items()):
            family.add_metric(list(labels), float(count))
        yield family

    def _counters(self) -> Iterator[Any]:
        family = CounterMetricFamily("kdwatch_events", "Records consumed per kind and outcome (valid, or the rejection, "
                                     "late, unmatched or duplicate reason)", labels=["kind", "outcome"])
        dead = CounterMetricFamily("kdwatch_dead_letters", "Records sent to a dead-letter topic", labels=["kind", "reason"])
        # Every (kind, reason) is reported from 0 on, so rate() sees a reason's first occurrence.
        counts = {(kind, reason): 0 for kind in INPUTS for reason in ("valid", "duplicate", *DEAD_LETTER_REASONS)}
        counts.update(self.store.counters())
        for (kind, reason), count in sorted(counts.items()):
            family.add_metric([kind, reason], float(count))
            if reason not in ("valid", "duplicate"):
                dead.add_metric([kind, reason], float(count))
        yield family
        yield dead

    def _slos(self) -> Iterator[Any]:
        document = self.slo_store.get_slo_document()
        burn = GaugeMetricFamily("kdwatch_slo_burn_rate", "Burn rate per SLO and window", labels=["slo", "window"])
        budget = GaugeMetricFamily("kdwatch_slo_budget_remaining", "Error budget remaining over the period", labels=["slo"])
        firing = GaugeMetricFamily("kdwatch_alerts_firing", "Alerts firing", labels=["slo", "severity", "tier"])
        deliveries = GaugeMetricFamily("kdwatch_webhook_deliveries", "Notifications by receiver and outcome",
                                       labels=["receiver", "status"])
        if document is not None:
            config = parse_slo_file(document)
            engine = SloEngine(config)
            state, through = self.slo_store.load_engine("default")
            engine.load_state(state)
            for slo in config.slos:
                series = engine.series[slo.name]
                lengths = sorted({w.long_ms for w in engine.windows[slo.name]} | {w.short_ms for w in engine.windows[slo.name]})

                for length in lengths:
                    value = burn_rate(*series.sums(through, length), slo.objective)
                    if value is not None:
                        burn.add_metric([slo.name, format_duration_ms(length)], value)
                remaining = budget_remaining(*series.sums(through, slo.period_ms), slo.objective)
                if remaining is not None:
                    budget.add_metric([slo.name], remaining)
            for (name, severity, tier), alert in sorted(engine.alerts.items()):
                firing.add_metric([name, severity, tier], 1.0 if alert.firing else 0.0)
        for (receiver, status), count in sorted(self.slo_store.delivery_counts().items()):
            deliveries.add_metric([receiver, status], float(count))
        yield from (burn, budget, firing, deliveries)

    def _pipeline(self) -> Iterator[Any]:
        """Facts about kdwatch's own pipeline that its self-alerts read (deploy/prometheus/self.rules.yml)."""
        committed = GaugeMetricFamily("kdwatch_consumer_committed_offset",
                                      "Next offset the collectors committed per partition (moves with every commit)",
                                      labels=["group", "topic", "partition"])
        for (group, topic, partition), offset in sorted(self.store.offsets().items()):
            committed.add_metric([group, topic, str(partition)], float(offset))
        lease = GaugeMetricFamily("kdwatch_engine_lease_until_timestamp_seconds",
                                  "When the live SLO engine's leader lease runs out (renewed every cycle; 0: no cycle yet)")
        lease.add_metric([], (self.slo_store.lease_until() or 0) / 1000)
        pending = GaugeMetricFamily("kdwatch_notifications_pending", "Notifications waiting in the outbox", labels=["receiver"])
        oldest = GaugeMetricFamily("kdwatch_notifications_oldest_pending_timestamp_seconds",
                                   "Creation time of the oldest notification waiting in the outbox", labels=["receiver"])
        for receiver, (count, created) in sorted(self.slo_store.pending_backlog().items()):
            pending.add_metric([receiver], float(count))
            oldest.add_metric([receiver], created / 1000)
        jobs = GaugeMetricFamily("kdwatch_retrain_jobs", "Retrain jobs per model and status (queued, running, promoted, "
                                 "rejected, failed)", labels=["model", "status"])
        for (model, status), count in sorted(self.jobs.status_counts().items()):
            jobs.add_metric([model, status], float(count))
        yield from (committed, lease, pending, oldest, jobs)
