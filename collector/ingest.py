"""Decode one raw value and hand it to a joiner: the step shared by the Kafka and offline paths."""

from __future__ import annotations

from typing import Any

import orjson

from kdwatch.collector.contract import MAX_VALUE_BYTES, decode_label, decode_prediction, decode_teacher, parse_ts
from kdwatch.collector.join import PartitionJoiner, window_start_of
from kdwatch.collector.merge import UNREADABLE
from kdwatch.collector.records import Source, WindowKey
from kdwatch.errors import ContractError

KINDS = ("prediction", "teacher", "label")


def merge_key(raw: bytes) -> tuple[int, dict[str, Any] | None]:
    """(merge key, parsed object) of a raw value: its event time, or UNREADABLE (-1) when it has none.

    The object is handed on to the decoder so each value is parsed once; an oversized value is left
    unparsed for the decoder to reject with its reason.
    """
    if len(raw) > MAX_VALUE_BYTES:
        return UNREADABLE, None
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return UNREADABLE, None
    if not isinstance(obj, dict):
        return UNREADABLE, None
    ts = obj.get("ts")
    if type(ts) is int:
        return ts, obj
    if isinstance(ts, str):
        try:
            return parse_ts(ts), obj
        except ContractError:
            return UNREADABLE, obj
    return UNREADABLE, obj


def window_hint_fields(obj: Any) -> tuple[str, str, int] | None:
    """(model, student_version, event time) of a rejected prediction's parsed JSON, when that much is readable."""
    try:
        model, version = obj["model"], obj["student_version"]
        if isinstance(model, str) and isinstance(version, str) and 0 < len(model) <= 256 and 0 < len(version) <= 256:
            return model, version, parse_ts(obj["ts"])
    except (KeyError, TypeError, ContractError):
        pass  # no window to attribute it to: it is still counted per topic and dead-lettered
    return None


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
