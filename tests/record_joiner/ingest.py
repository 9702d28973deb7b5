"""Decode one raw value and hand it to the record joiner (what collector.ingest did for it)."""

from __future__ import annotations

from typing import Any

import orjson

from kdwatch.collector.contract import decode_label, decode_prediction, decode_teacher
from kdwatch.collector.ingest import window_hint_fields
from kdwatch.collector.merge import window_start_of
from kdwatch.collector.records import Source, WindowKey
from kdwatch.errors import ContractError
from tests.record_joiner.join import PartitionJoiner


def _window_hint(raw: bytes, window_ms: int) -> WindowKey | None:
    """The window a rejected prediction would have counted in, when that much of it is readable."""
    try:
        fields = window_hint_fields(orjson.loads(raw))
    except orjson.JSONDecodeError:
        return None
    return None if fields is None else WindowKey(fields[0], fields[1], window_start_of(fields[2], window_ms))


def ingest(joiner: PartitionJoiner, kind: str, raw: bytes, source: Source | None = None,
           parsed: dict[str, Any] | None = None) -> None:
    """Validate ``raw`` (or its already ``parsed`` JSON) as a ``kind`` event and feed it to ``joiner``.

    A value that breaks the contract is rejected with its reason (counted, and dead-lettered when it
    came from Kafka).
    """
    value: bytes | dict[str, Any] = parsed if parsed is not None else raw
    try:
        if kind == "prediction":
            prediction = decode_prediction(value)
            if joiner.rejects_future(kind, prediction.ts_ms, source):
                return
            joiner.add_prediction(prediction, source)
        elif kind == "teacher":
            replay = decode_teacher(value)
            if joiner.rejects_future(kind, replay.ts_ms, source):
                return
            joiner.add_teacher(replay, source)
        elif kind == "label":
            label = decode_label(value)
            if joiner.rejects_future(kind, label.ts_ms, source):
                return
            joiner.add_label(label, source)
        else:
            raise ValueError(f"unknown kind {kind!r}")
        joiner.count(kind, "valid")
    except ContractError as exc:
        hint = _window_hint(raw, joiner.window_ms) if kind == "prediction" else None
        joiner.reject(kind, source, exc.reason, exc.message, hint)
