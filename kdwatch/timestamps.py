"""Event-time instants as text: the one formatter every output (windows, notifications, API, reports) uses."""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339(ms: int) -> str:
    """Epoch milliseconds as RFC 3339 UTC text: 2026-11-28T03:00:00Z (milliseconds when not whole)."""
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if ms % 1000:
        text += f".{ms % 1000:03d}"
    return text + "Z"
