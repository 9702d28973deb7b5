"""The SLO engine: burn rates per window pair, alert lifecycle, deduplicated notifications, retrains.

Everything runs on event time: feed it each window end in order (:meth:`SloEngine.advance`) and it
returns the notifications that would be sent at that moment, so a backtest over history and the
live engine behave the same.

- An alert is one (SLO, severity, tier) with labels; its fingerprint is a hash of the sorted label
  set, as Alertmanager's. It fires when both windows of its pair burn faster than the pair's rate,
  the long one significantly so (``alerting.confidence``, slo.burn), and the long window has at
  least ``min_events``. Each window holds the history it has: at stream start a pair is evaluated
  over less than its length, which the guard makes safe. A firing alert resolves when its long
  window stops burning, or when its short window has stayed at or below the rate for
  ``alerting.resolve_hold`` (default: the short window's length), so one incident gives one firing
  and one resolution.
- One notification when it starts firing, a repeat every ``repeat_interval`` while it fires, one
  when it resolves (only if its firing was notified).
- A firing page inhibits the tickets of the same SLO (they are not notified while it fires).
- Retrain policies trigger on a rising edge (an SLO alert of the named severity starting to fire,
  or PSI above a bound for k consecutive windows), at most once per cooldown per model.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from kdwatch.analyzer.window import WindowState
from kdwatch.durations import parse_duration_ms
from kdwatch.slo.burn import BurnWindow, burn_rate, long_window_burning, windows_from_config
from kdwatch.slo.config import RetrainPolicy, Slo, SloFile
from kdwatch.slo.sli import events_good_total, timeslice_verdict
from kdwatch.timestamps import rfc3339

NO_DATA_TIER = "no-data"
RETRAIN_NAMESPACE = uuid.UUID("6f1d6a52-6c1f-4c83-9b9e-1f3c2f1a7d10")


def fingerprint(labels: dict[str, str]) -> str:
    """16 hex digits of SHA-256 over the sorted label set (stable across processes and versions)."""
    text = "\xff".join(f"{k}\xfe{labels[k]}" for k in sorted(labels))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class WindowInput:
    """One stored window as the engine sees it: its state and its public result."""

    model: str
    student_version: str
    end_ms: int
    state: WindowState
    result: dict[str, Any]


@dataclass
class _Series:
    """(end, bad, total) points of one SLO, kept for its longest window."""

    horizon_ms: int
    points: deque[tuple[int, float, float]] = field(default_factory=deque)

    def add(self, end_ms: int, bad: float, total: float) -> None:
        self.points.append((end_ms, bad, total))
        while self.points and self.points[0][0] <= end_ms - self.horizon_ms:
            self.points.popleft()

    def sums(self, now_ms: int, length_ms: int) -> tuple[float, float]:
        bad = total = 0.0
        for end, b, t in reversed(self.points):
            if end <= now_ms - length_ms:
                break
            if end <= now_ms:
                bad += b
                total += t
        return bad, total


@dataclass
class Alert:
    labels: dict[str, str]
    window: BurnWindow | None  # None: the no-data alert
    firing: bool = False
    started_at: int | None = None
    notified_at: int | None = None
    quiet_since: int | None = None  # firing, and the short window at or below the rate since then

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.labels)


@dataclass(frozen=True)
class Silence:
    """Equality matchers on alert labels, active over [starts_at, ends_at) (epoch ms)."""

    id: str
    matchers: dict[str, str]
    starts_at: int
    ends_at: int
    created_by: str = ""
    comment: str = ""

    def mutes(self, labels: dict[str, str], at_ms: int) -> bool:
        return self.starts_at <= at_ms < self.ends_at and all(labels.get(k) == v for k, v in self.matchers.items())


class SloEngine:
    def __init__(self, config: SloFile) -> None:
        self.config = config
        self.windows: dict[str, tuple[BurnWindow, ...]] = {
            s.name: windows_from_config(s.period, s.alerting.windows) for s in config.slos}
        self.series = {s.name: _Series(max(w.long_ms for w in self.windows[s.name])) for s in config.slos}
        self.alerts: dict[tuple[str, str, str], Alert] = {}
        for slo in config.slos:
            for w in self.windows[slo.name]:
                labels = {"alertname": "KdwatchSloBurn", "slo": slo.name, "severity": w.severity, "tier": w.tier,
                          "model": slo.model}
                self.alerts[(slo.name, w.severity, w.tier)] = Alert(labels, w)
            if slo.alerting.no_data is not None:
                labels = {"alertname": "KdwatchSloNoData", "slo": slo.name, "severity": "ticket", "tier": NO_DATA_TIER,
                          "model": slo.model}
                self.alerts[(slo.name, "ticket", NO_DATA_TIER)] = Alert(labels, None)
        self._last_retrain: dict[str, int] = {}
        self._psi_streak: dict[tuple[str, int], int] = {}
        self._psi_armed: dict[tuple[str, int], bool] = {}
        self.silences: list[Silence] = []
        self._last_data: dict[str, int] = {}  # SLO -> event time of its last window with data
        self.in_flight: set[str] = set()  # models with a retrain request not yet delivered (set by the live engine)

    # ---- durable state (the live engine stores it with the notifications it produced) ----

    def state_dict(self) -> dict[str, Any]:
        return {
            "series": {name: [list(p) for p in series.points] for name, series in self.series.items()},
            "alerts": [{"key": list(key), "firing": a.firing, "started_at": a.started_at, "notified_at": a.notified_at,
                        "quiet_since": a.quiet_since} for key, a in self.alerts.items()],
            "last_retrain": self._last_retrain,
            "last_data": self._last_data,
            "psi": [[model, i, self._psi_streak.get((model, i), 0), self._psi_armed.get((model, i), True)]
                    for model, i in set(self._psi_streak) | set(self._psi_armed)],
        }

    def load_state(self, data: dict[str, Any]) -> None:
        for name, points in data.get("series", {}).items():
            if name in self.series:
                self.series[name].points = deque((int(e), float(b), float(t)) for e, b, t in points)
        for item in data.get("alerts", []):
            alert = self.alerts.get(tuple(item["key"]))  # type: ignore[arg-type]
            if alert is not None:  # an alert of an SLO that was since removed is dropped
                alert.firing, alert.started_at, alert.notified_at = item["firing"], item["started_at"], item["notified_at"]
                alert.quiet_since = item.get("quiet_since")  # absent in states stored before the hold existed
        self._last_retrain = {k: int(v) for k, v in data.get("last_retrain", {}).items()}
        self._last_data = {k: int(v) for k, v in data.get("last_data", {}).items()}
        for model, i, streak, armed in data.get("psi", []):
            self._psi_streak[(model, i)] = streak
            self._psi_armed[(model, i)] = armed

    def firing(self) -> list[Alert]:
        return [a for a in self.alerts.values() if a.firing]

    # ---- SLIs ----
    # point(): (bad, total) of one SLO over the windows ending at one moment, or None without any.

    def point(self, slo: Slo, windows: list[WindowInput]) -> tuple[float, float] | None:
        chosen = [w for w in windows if w.model == slo.model and slo.student_version in (None, w.student_version)]
        if not chosen:
            return None
        if slo.sli.events is not None:
            good = total = 0
            for w in chosen:
                g, t = events_good_total(slo.sli.events, w.state)
                good, total = good + g, total + t
            return float(total - good), float(total)
        assert slo.sli.timeslices is not None
        verdicts = [timeslice_verdict(slo.sli.timeslices, w.result, slo.alerting.confidence) for w in chosen]
        known = [v for v in verdicts if v is not None]
        if not known:
            return 0.0, 0.0  # no data: neither good nor bad
        return float(sum(1 for v in known if not v)), float(len(known))

    # ---- evaluation ----

    def advance(self, end_ms: int, windows: list[WindowInput]) -> list[dict[str, Any]]:
        """Account the windows ending at ``end_ms`` and return the notifications due at that moment."""
        out: list[dict[str, Any]] = []
        for slo in self.config.slos:
            point = self.point(slo, windows)
            if point is not None:
                self.series[slo.name].add(end_ms, *point)
                if point[1] > 0:
                    self._last_data[slo.name] = end_ms
        page_firing: set[str] = set()
        for severity in ("page", "ticket"):
            for slo in self.config.slos:
                for w in self.windows[slo.name]:
                    if w.severity != severity:
                        continue
                    out.extend(self._evaluate(slo, w, end_ms, inhibited=slo.name in page_firing))
                    if severity == "page" and self.alerts[(slo.name, w.severity, w.tier)].firing:
                        page_firing.add(slo.name)
        for slo in self.config.slos:
            out.extend(self._evaluate_no_data(slo, end_ms))
        out.extend(self._retrains(end_ms, windows, out))
        return out

    def _evaluate(self, slo: Slo, w: BurnWindow, now: int, inhibited: bool) -> list[dict[str, Any]]:
        alert = self.alerts[(slo.name, w.severity, w.tier)]
        series = self.series[slo.name]
        bad_l, total_l = series.sums(now, w.long_ms)
        bad_s, total_s = series.sums(now, w.short_ms)
        burn_long = burn_rate(bad_l, total_l, slo.objective)
        burn_short = burn_rate(bad_s, total_s, slo.objective)
        short_burning = burn_short is not None and burn_short > w.burn_rate
        if not alert.firing:
            # Timeslice SLIs are judged significant slice by slice (slo.sli): a pair holds too few slices
            # for a bound over them (12 one-minute slices could never show 99.9 %).
            confidence = slo.alerting.confidence if slo.sli.events is not None else 0.0
            condition = (short_burning and total_l >= slo.alerting.min_events
                         and bool(long_window_burning(bad_l, total_l, slo.objective, w.burn_rate, confidence)))
        else:
            condition = self._still_firing(slo, w, alert, now, burn_long, short_burning)
        return self._transition(slo, alert, condition, now, inhibited, burn_long, burn_short)

    @staticmethod
    def _still_firing(slo: Slo, w: BurnWindow, alert: Alert, now: int, burn_long: float | None, short_burning: bool) -> bool:
        """A firing pair holds until its long window stops burning or its short one has been quiet for the hold."""
        if burn_long is None or burn_long <= w.burn_rate:
            return False
        if short_burning:
            alert.quiet_since = None
            return True
        if alert.quiet_since is None:
            alert.quiet_since = now
        hold_ms = parse_duration_ms(slo.alerting.resolve_hold) if slo.alerting.resolve_hold is not None else w.short_ms
        return now - alert.quiet_since < hold_ms

    def _evaluate_no_data(self, slo: Slo, now: int) -> list[dict[str, Any]]:
        """The no-data alert: no events (or no slice with enough samples) for ``alerting.no_data``."""
        if slo.alerting.no_data is None:
            return []
        last = self._last_data.setdefault(slo.name, now)  # counting starts at the first evaluation
        condition = now - last >= parse_duration_ms(slo.alerting.no_data)
        return self._transition(slo, self.alerts[(slo.name, "ticket", NO_DATA_TIER)], condition, now, False, None, None)

    def _transition(self, slo: Slo, alert: Alert, condition: bool, now: int, inhibited: bool,
                    burn_long: float | None, burn_short: float | None) -> list[dict[str, Any]]:
        def note(status: str) -> dict[str, Any]:
            return {"type": "alert", "status": status, "slo": slo.name, "severity": alert.labels["severity"],
                    "tier": alert.labels["tier"], "model": slo.model, "fingerprint": alert.fingerprint, "at": rfc3339(now),
                    "burn_long": burn_long, "burn_short": burn_short}

        if condition:
            if not alert.firing:
                alert.firing, alert.started_at, alert.notified_at, alert.quiet_since = True, now, None, None
            repeat_ms = parse_duration_ms(slo.alerting.repeat_interval)
            muted = inhibited or any(s.mutes(alert.labels, now) for s in self.silences)
            if not muted and (alert.notified_at is None or now - alert.notified_at >= repeat_ms):
                alert.notified_at = now
                return [note("firing")]
            return []
        if alert.firing:
            was_notified = alert.notified_at is not None
            alert.firing, alert.started_at, alert.notified_at, alert.quiet_since = False, None, None, None
            if was_notified:
                return [note("resolved")]
        return []

    def check_no_data(self, now_ms: int) -> list[dict[str, Any]]:
        """Evaluate only the no-data alerts at ``now_ms``: for when no window at all became final."""
        out: list[dict[str, Any]] = []
        for slo in self.config.slos:
            out.extend(self._evaluate_no_data(slo, now_ms))
        return out

    # ---- retrains ----

    def _retrains(self, now: int, windows: list[WindowInput], notes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        started = {(n["slo"], n["severity"]) for n in notes if n["type"] == "alert" and n["status"] == "firing"
                   and self.alerts[(n["slo"], n["severity"], n["tier"])].started_at == now}
        for policy in self.config.retrain:
            reason = self._retrain_reason(policy, now, windows, started)
            if reason is None:
                continue
            last = self._last_retrain.get(policy.model)
            if last is not None and now - last < parse_duration_ms(policy.cooldown):
                continue
            if policy.model in self.in_flight:
                continue  # at most one retrain in flight per model
            self.in_flight.add(policy.model)
            self._last_retrain[policy.model] = now
            webhook_id = "msg_" + uuid.uuid5(RETRAIN_NAMESPACE, f"{policy.model}|{now}|{reason}").hex
            note = {"type": "retrain", "model": policy.model, "at": rfc3339(now), "reason": reason, "webhook_id": webhook_id}
            if policy.trainer is not None:
                note["trainer"] = policy.trainer
            out.append(note)
        return out

    def _retrain_reason(self, policy: RetrainPolicy, now: int, windows: list[WindowInput],
                        started: set[tuple[str, str]]) -> str | None:
        reason = None
        for i, cond in enumerate(policy.when):
            if cond.slo is not None:
                if (cond.slo, cond.severity) in started and reason is None:
                    reason = f"slo {cond.slo} {cond.severity}"
                continue
            assert cond.psi_feature is not None and cond.psi_above is not None
            found = [_psi_excess(w.result, cond.psi_feature, cond.psi_over_expected) for w in windows if w.model == policy.model]
            values: list[float] = [v for v in found if v is not None]
            if not values:
                continue
            key = (policy.model, i)
            above = max(values) > cond.psi_above
            self._psi_streak[key] = self._psi_streak.get(key, 0) + 1 if above else 0
            if not above:
                self._psi_armed[key] = True  # hysteresis: re-armed only after PSI went back below
            if self._psi_streak[key] >= cond.consecutive_windows and self._psi_armed.get(key, True):
                self._psi_armed[key] = False
                if reason is None:
                    reason = f"psi {cond.psi_feature} > {cond.psi_above} for {cond.consecutive_windows} windows"
        return reason


def _psi_excess(result: dict[str, Any], feature: str, over_expected: bool) -> float | None:
    """A window's PSI of ``feature``, less its no-drift expectation when ``over_expected``; None without one."""
    value = (result.get("psi") or {}).get(feature)
    if value is None or not over_expected:
        return value
    return float(value) - float((result.get("psi_expected") or {}).get(feature) or 0.0)


def backtest(config: SloFile, windows: list[WindowInput]) -> list[dict[str, Any]]:
    """Run the engine over stored or offline windows; notifications in event-time order."""
    engine = SloEngine(config)
    by_end: dict[int, list[WindowInput]] = {}
    for w in windows:
        by_end.setdefault(w.end_ms, []).append(w)
    out: list[dict[str, Any]] = []
    for end in sorted(by_end):
        engine.in_flight = set()  # a backtest delivers at once: nothing stays in flight
        out.extend(engine.advance(end, by_end[end]))
    return out
