"""What the merge reads of a raw value before decoding it: its merge key, and the window a rejected prediction names."""

from __future__ import annotations

from typing import Any

import orjson

from kdwatch.collector.contract import MAX_VALUE_BYTES, parse_ts
from kdwatch.collector.merge import UNREADABLE
from kdwatch.errors import ContractError


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
