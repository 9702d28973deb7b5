"""kdwatch's alerts on itself (``kdwatch prometheus-rules --self``; deploy/prometheus/self.rules.yml).

They read what the API's ``/metrics`` reports from the database (committed offsets, the consumer lag
refreshed in the background, the counters, the engine's lease, the outbox, retrain jobs), so they hold
for a collector or engine that died and cannot report anything itself. Labels follow the SLO alerts'
conventions (``severity`` page|ticket, ``tier``) so Alertmanager routes them alike; ``tier: self``
tells them apart. Every alert carries a ``runbook`` annotation: the first thing to check.

The timings are parameters so that a test can run the same rules in seconds against a real Prometheus
(tests/integration/test_self_alerts.py); the shipped file uses the defaults, which assume the default
grace (10 min) and lag refresh (10 s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdwatch.durations import format_duration_ms


@dataclass(frozen=True)
class SelfAlertTimings:
    """Every duration and bound of the self-alerts (ms, or a plain number)."""

    stall_after_ms: int = 600_000  # records wait and no commit for this long: the collector is stalled
    stall_for_ms: int = 300_000
    lag_growth_over_ms: int = 1_800_000
    lag_growth_min: int = 10_000
    lag_unknown_after_ms: int = 120_000  # the lag has not been read from Kafka for this long
    lag_unknown_for_ms: int = 60_000
    dead_letter_over_ms: int = 600_000
    dead_letter_share: float = 0.05
    dead_letter_for_ms: int = 600_000
    engine_stalled_after_ms: int = 300_000  # past the engine's lease (renewed every cycle)
    engine_stalled_for_ms: int = 60_000
    backlog_after_ms: int = 900_000  # the oldest pending notification is this old
    backlog_for_ms: int = 60_000
    not_final_after_ms: int = 1_500_000  # no window became final for this long (grace + window + margin)
    not_final_for_ms: int = 300_000
    retrain_failed_over_ms: int = 3_600_000


def _d(ms: int) -> str:
    return format_duration_ms(ms)


def _s(ms: int) -> str:
    return f"{ms / 1000:g}"


def _rule(name: str, expr: str, for_ms: int, severity: str, summary: str, description: str, runbook: str) -> dict[str, Any]:
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if for_ms:
        rule["for"] = _d(for_ms)
    rule["labels"] = {"severity": severity, "tier": "self"}
    rule["annotations"] = {"summary": summary, "description": description, "runbook": runbook}
    return rule


def self_rules(t: SelfAlertTimings | None = None) -> dict[str, Any]:
    t = t or SelfAlertTimings()
    lag = "sum by (group) (kdwatch_consumer_lag)"
    rules = [
        _rule("KdwatchCollectorStalled",
              f"{lag} > 0\nand sum by (group) (changes(kdwatch_consumer_committed_offset[{_d(t.stall_after_ms)}])) == 0",
              t.stall_for_ms, "page",
              f"kdwatch collector group {{{{ $labels.group }}}} has unread records and committed nothing for {_d(t.stall_after_ms)}",
              "Records wait (lag above 0, as last read) and no partition's committed offset moved: the collectors "
              "crashed, are stuck, or cannot reach Kafka or the database.",
              "Check the collector processes and their logs (`kdwatch collect` logs every outage and reopened "
              "consumer), then /readyz; restart a collector: it resumes from the stored offsets."),
        _rule("KdwatchConsumerLagGrowing",
              f"{lag} > {t.lag_growth_min}\nand {lag} > sum by (group) (kdwatch_consumer_lag offset {_d(t.lag_growth_over_ms)})",
              t.lag_growth_over_ms, "ticket",
              "kdwatch collector group {{ $labels.group }} falls behind: {{ $value }} records unread and growing",
              f"Over {t.lag_growth_min} records unread and more than {_d(t.lag_growth_over_ms)} ago: the collectors "
              "read slower than producers write.",
              "Compare kdwatch_collector_batch_duration_seconds with the input rate; add collectors (up to the "
              "partition count) or partitions, or look for a slow database."),
        _rule("KdwatchConsumerLagUnknown",
              f"time() - kdwatch_consumer_lag_last_success_timestamp_seconds > {_s(t.lag_unknown_after_ms)}",
              t.lag_unknown_for_ms, "ticket",
              "kdwatch cannot read the consumer lag from Kafka (last success {{ $value | humanizeDuration }} ago)",
              "The API's background lag refresh has failed since then: Kafka unreachable from the API, or a "
              "stored topic deleted. The lag series show their last values meanwhile.",
              "Check the brokers and the API's KDWATCH_BOOTSTRAP_SERVERS and security settings (/readyz names "
              "the failing dependency); kdwatch_consumer_lag_refresh_failures_total counts the failures."),
        _rule("KdwatchDeadLetterShareHigh",
              f"sum(rate(kdwatch_dead_letters_total[{_d(t.dead_letter_over_ms)}]))\n"
              f"/ sum(rate(kdwatch_events_total[{_d(t.dead_letter_over_ms)}])) > {t.dead_letter_share:g}",
              t.dead_letter_for_ms, "ticket",
              "{{ $value | humanizePercentage }} of kdwatch's input goes to the dead-letter topics",
              f"More than {t.dead_letter_share:.0%} of the records read in {_d(t.dead_letter_over_ms)} were "
              "dead-lettered (rejected, late, unmatched).",
              "kdwatch_dead_letters_total{kind,reason} names the reason; read a few records of <topic>.DLT "
              "(header kdwatch.error.message) and fix the producer, or raise the grace for `late`."),
        _rule("KdwatchEngineStalled",
              f"time() - kdwatch_engine_lease_until_timestamp_seconds > {_s(t.engine_stalled_after_ms)}\n"
              "and kdwatch_engine_lease_until_timestamp_seconds > 0",
              t.engine_stalled_for_ms, "page",
              "the kdwatch SLO engine has not evaluated for {{ $value | humanizeDuration }}: no SLO alert can fire",
              "The live SLO engine renews its leader lease every cycle: no replica has done so since.",
              "Check the `kdwatch engine` processes and their database connection; any replica takes the lease "
              "over once started."),
        _rule("KdwatchNotificationBacklog",
              f"time() - kdwatch_notifications_oldest_pending_timestamp_seconds > {_s(t.backlog_after_ms)}",
              t.backlog_for_ms, "page",
              "kdwatch notifications to {{ $labels.receiver }} wait undelivered for {{ $value | humanizeDuration }}",
              f"A notification has waited in the outbox for {_d(t.backlog_after_ms)}: its receiver is down or refuses it.",
              "`kdwatch deliveries` shows each attempt's status code and error; fix the receiver (URL, secret, "
              "availability), then `kdwatch deliveries --retry-now` (otherwise the next backoff step, up to hours)."),
        _rule("KdwatchWindowsNotFinal",
              f"time() - max by (model, student_version) (kdwatch_window_end_timestamp_seconds) > {_s(t.not_final_after_ms)}",
              t.not_final_for_ms, "ticket",
              "no window of {{ $labels.model }} {{ $labels.student_version }} became final for {{ $value | humanizeDuration }}",
              f"No window became final for {_d(t.not_final_after_ms)} (grace + window + margin): the model's data "
              "stopped, or the watermark is held back by an input that is silent but not yet idle.",
              "Check the producers of the three topics and kdwatch_collector_input_event_time_seconds per input; "
              "a retired student version also stops here (silence it)."),
        _rule("KdwatchRetrainJobFailed",
              f'delta(kdwatch_retrain_jobs{{status="failed"}}[{_d(t.retrain_failed_over_ms)}]) > 0',
              0, "ticket",
              f"a retrain job of {{{{ $labels.model }}}} failed in the last {_d(t.retrain_failed_over_ms)}",
              "The training runner recorded a failed job (transfer set too small, training error).",
              "GET /v1/models/{model}/retrain-jobs (or the runner's /v1/jobs/{id}) gives the job's log and error."),
    ]
    return {"groups": [{"name": "kdwatch-self", "rules": rules}]}
