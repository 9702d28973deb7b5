"""Notification payloads: Alertmanager's webhook JSON, Alertmanager's API v2 alerts, retrain requests.

Pure functions from engine notifications to the JSON each receiver expects; delivery is in
slo.dispatch.
"""

from __future__ import annotations

import hashlib
from typing import Any

from kdwatch.slo.engine import Alert
from kdwatch.timestamps import rfc3339

ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's "no end" marker


def outbox_id(*parts: str) -> str:
    """A stable delivery id (the webhook-id receivers de-duplicate on)."""
    return "msg_" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def alert_entry(note: dict[str, Any], starts_at: str, external_url: str = "") -> dict[str, Any]:
    """One alert of an Alertmanager webhook message, from an engine notification."""
    labels = {"alertname": "KdwatchSloBurn", "slo": note["slo"], "severity": note["severity"], "tier": note["tier"],
              "model": note["model"]}
    return {
        "status": note["status"],
        "labels": labels,
        "annotations": {
            "summary": f"SLO {note['slo']} of {note['model']} burning its error budget ({note['severity']}, {note['tier']})",
            "burn_long": f"{note['burn_long']:.3f}" if note["burn_long"] is not None else "",
            "burn_short": f"{note['burn_short']:.3f}" if note["burn_short"] is not None else "",
        },
        "startsAt": starts_at,
        "endsAt": note["at"] if note["status"] == "resolved" else ZERO_TIME,
        "generatorURL": f"{external_url}/v1/slos/{note['slo']}" if external_url else "",
        "fingerprint": note["fingerprint"],
    }


def alertmanager_webhook_message(alerts: list[dict[str, Any]], model: str, receiver: str = "kdwatch",
                                 external_url: str = "") -> dict[str, Any]:
    """Alertmanager's webhook payload (version 4), grouped by model, so existing receivers work unchanged."""
    common = dict(alerts[0]["labels"]) if alerts else {}
    for entry in alerts[1:]:
        common = {k: v for k, v in common.items() if entry["labels"].get(k) == v}
    status = "firing" if any(a["status"] == "firing" for a in alerts) else "resolved"
    return {
        "version": "4",
        "groupKey": f'{{}}:{{model="{model}"}}',
        "truncatedAlerts": 0,
        "status": status,
        "receiver": receiver,
        "groupLabels": {"model": model},
        "commonLabels": common,
        "commonAnnotations": {},
        "externalURL": external_url,
        "alerts": alerts,
    }


def alertmanager_api_alerts(firing: list[Alert], resolved: list[tuple[Alert, int]]) -> list[dict[str, Any]]:
    """The body of POST /api/v2/alerts: firing alerts (re-sent every cycle) and resolved ones with endsAt."""
    out = []
    for alert in firing:
        assert alert.started_at is not None
        out.append({"labels": alert.labels, "annotations": {"summary": f"SLO {alert.labels['slo']} burning"},
                    "startsAt": rfc3339(alert.started_at)})
    for alert, ended_at in resolved:
        out.append({"labels": alert.labels, "annotations": {"summary": f"SLO {alert.labels['slo']} burning"},
                    "endsAt": rfc3339(ended_at)})
    return out


def retrain_payload(note: dict[str, Any], student_version: str | None, teacher_version: str | None,
                    data_from_ms: int, data_to_ms: int, numbers: dict[str, Any]) -> dict[str, Any]:
    """What the training runner needs: which model, why, and the event-time range to distil from."""
    return {
        "type": "kdwatch.retrain",
        "webhook_id": note["webhook_id"],
        "model": note["model"],
        "student_version": student_version,
        "teacher_version": teacher_version,
        "trigger": {"reason": note["reason"], "at": note["at"], **numbers},
        "data": {"from": rfc3339(data_from_ms), "to": rfc3339(data_to_ms)},
        **({"trainer": note["trainer"]} if note.get("trainer") else {}),
    }
