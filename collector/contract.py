"""Event contract v1: the wire format of predictions, teacher replays and labels.

Each Kafka value (and each JSONL line offline) is one JSON object; the key is the ``request_id``.
``decode_prediction`` / ``decode_teacher`` / ``decode_label`` validate a raw value and return a typed
event, or raise :class:`ContractError` with a stable ``reason`` code. The JSON Schema files under
``schemas/`` describe the same rules for producers in other languages.

>>> decode_label(b'{"request_id": "r1", "model": "m", "label": 3, "ts": 1767225600000}').label
3
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import orjson

from kdwatch.errors import ContractError

CONTRACT_VERSION = 1
MAX_VALUE_BYTES = 1024 * 1024
MAX_STRING_CHARS = 256
MAX_FEATURES = 256
MAX_CLASSES = 10_000
MAX_TOKENS = 4_096  # tokens of one generated sequence
MAX_PROMPT_TOKENS = 8_192  # a generative prediction's prompt, for the teacher replayer
# Probabilities must sum to 1 within this tolerance before they are renormalised.
PROB_SUM_TOLERANCE = 1e-3
# Event times outside [2000-01-01, 2100-01-01) are typos (seconds for milliseconds, say), not data.
MIN_TS_MS = 946_684_800_000
MAX_TS_MS = 4_102_444_800_000

PREDICTION_FIELDS = frozenset(
    {"v", "request_id", "model", "student_version", "ts", "probs", "logits", "latency_ms",
     "features", "label", "audit", "segment", "generation", "prompt_tokens"}
)
TEACHER_FIELDS = frozenset({"v", "request_id", "model", "teacher_version", "ts", "probs", "logits", "generation"})
LABEL_FIELDS = frozenset({"v", "request_id", "model", "label", "ts"})
AUDIT_VALUES = ("member", "nonmember")

Features = dict[str, float | str]
_NUMBER_TYPES = (int, float)  # type(x) checks: bool is a subclass of int and must not pass


@dataclass(slots=True)
class Distribution:
    """A class distribution as sent: ``probs`` renormalised; ``log_probs`` exact when sent as logits."""

    probs: np.ndarray
    log_probs: np.ndarray | None

    @property
    def n_classes(self) -> int:
        return int(self.probs.shape[0])


@dataclass(slots=True)
class Generation:
    """A generated sequence: the student's tokens with its log-probabilities of them, or the teacher's
    log-probabilities of the student's tokens with its own most likely token at each position."""

    logprobs: np.ndarray  # float64, (L,), each <= 0
    tokens: np.ndarray | None = None  # int64, (L,): the student's output
    top1: np.ndarray | None = None  # int64, (L,): the teacher's argmax per position

    @property
    def length(self) -> int:
        return int(self.logprobs.shape[0])


@dataclass(slots=True)
class Prediction:
    request_id: str
    model: str
    student_version: str
    ts_ms: int
    dist: Distribution | None  # None for a generative prediction (``generation`` instead)
    latency_ms: float | None = None
    features: Features | None = None
    label: int | None = None
    audit: str | None = None
    segment: str | None = None
    generation: Generation | None = None
    prompt_tokens: list[int] | None = None  # a generative prediction's prompt, for the teacher replayer


@dataclass(slots=True)
class TeacherReplay:
    request_id: str
    model: str
    teacher_version: str
    ts_ms: int
    dist: Distribution | None  # None for the replay of a generative prediction
    generation: Generation | None = None


@dataclass(slots=True)
class Label:
    request_id: str
    model: str
    label: int
    ts_ms: int


Event = Prediction | TeacherReplay | Label


def _load(raw: bytes | str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(raw, dict):  # already parsed by the caller (the offline merge reads ts first)
        return raw
    size = len(raw.encode("utf-8") if isinstance(raw, str) else raw)
    if size > MAX_VALUE_BYTES:
        raise ContractError("too_large", f"value is {size} bytes, the limit is {MAX_VALUE_BYTES}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson rejects invalid UTF-8 with its own message; keep the reason specific.
        reason = "invalid_utf8" if "utf-8" in str(exc).lower() else "invalid_json"
        raise ContractError(reason, f"not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ContractError("not_an_object", f"value must be a JSON object, got {type(obj).__name__}")
    return obj


def _check_fields(obj: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ContractError("unknown_field", f"unknown field(s) {unknown[:5]}")
    version = obj.get("v", CONTRACT_VERSION)
    if version != CONTRACT_VERSION or isinstance(version, bool):
        raise ContractError("unsupported_version", f"v must be {CONTRACT_VERSION}, got {version!r}")


def _string(obj: dict[str, Any], field: str, required: bool = True) -> str | None:
    value = obj.get(field)
    if value is None:
        if required:
            raise ContractError("missing_field", f"{field} is required")
        return None
    if not isinstance(value, str):
        raise ContractError("wrong_type", f"{field} must be a string, got {type(value).__name__}")
    if not value:
        raise ContractError("empty_string", f"{field} must not be empty")
    if len(value) > MAX_STRING_CHARS:
        raise ContractError("string_too_long", f"{field} has {len(value)} characters, the limit is {MAX_STRING_CHARS}")
    return value


def parse_ts(value: Any, field: str = "ts") -> int:
    """Event time as integer epoch milliseconds, from RFC 3339 text or integer epoch milliseconds."""
    if value is None:
        raise ContractError("missing_field", f"{field} is required")
    if isinstance(value, bool):
        raise ContractError("wrong_type", f"{field} must be an RFC 3339 string or integer epoch milliseconds")
    if isinstance(value, int):
        ts_ms = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise ContractError("invalid_timestamp", f"{field} {value[:40]!r} is not RFC 3339") from None
        if parsed.tzinfo is None:
            raise ContractError("invalid_timestamp", f"{field} {value[:40]!r} has no UTC offset")
        ts_ms = round(parsed.timestamp() * 1000)
    else:
        raise ContractError("wrong_type", f"{field} must be an RFC 3339 string or integer epoch milliseconds")
    if not MIN_TS_MS <= ts_ms < MAX_TS_MS:
        raise ContractError("timestamp_out_of_range", f"{field} {value!r} is outside years 2000-2099 (epoch milliseconds?)")
    return ts_ms


def _number_array(obj: dict[str, Any], field: str) -> np.ndarray:
    values = obj[field]
    if not isinstance(values, list):
        raise ContractError("wrong_type", f"{field} must be an array of numbers")
    if not 2 <= len(values) <= MAX_CLASSES:
        raise ContractError("bad_class_count", f"{field} must have 2..{MAX_CLASSES} classes, got {len(values)}")
    for v in values:
        if type(v) not in _NUMBER_TYPES:
            raise ContractError("wrong_type", f"{field} must contain only numbers, got {type(v).__name__}")
    array = np.array(values, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ContractError("not_finite", f"{field} contains NaN or infinity")
    return array


def _int_array(values: Any, field: str) -> np.ndarray:
    if not isinstance(values, list) or not all(type(v) is int and v >= 0 for v in values):
        raise ContractError("wrong_type", f"{field} must be an array of integer token ids >= 0")
    try:
        return np.array(values, dtype=np.int64)
    except OverflowError:
        raise ContractError("wrong_type", f"{field} holds a token id beyond 64 bits") from None


def decode_generation(obj: dict[str, Any], teacher: bool) -> Generation:
    """``generation``: the student's {tokens, logprobs}, or the teacher's {logprobs, top1}."""
    value = obj["generation"]
    ids = "top1" if teacher else "tokens"
    if not isinstance(value, dict) or set(value) != {ids, "logprobs"}:
        raise ContractError("bad_generation", f"generation must be an object with exactly {ids} and logprobs")
    logprobs = value["logprobs"]
    if not isinstance(logprobs, list) or not 1 <= len(logprobs) <= MAX_TOKENS:
        raise ContractError("bad_generation", f"generation.logprobs must be an array of 1..{MAX_TOKENS} numbers")
    if not all(type(v) in _NUMBER_TYPES for v in logprobs):
        raise ContractError("wrong_type", "generation.logprobs must contain only numbers")
    array = np.array(logprobs, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ContractError("not_finite", "generation.logprobs contains NaN or infinity")
    if (array > 0).any():
        raise ContractError("bad_generation", "generation.logprobs are log-probabilities: each must be <= 0")
    tokens = _int_array(value[ids], f"generation.{ids}")
    if tokens.shape[0] != array.shape[0]:
        raise ContractError("bad_generation", f"generation.{ids} has {tokens.shape[0]} entries, logprobs {array.shape[0]}")
    return Generation(array, top1=tokens) if teacher else Generation(array, tokens=tokens)


def _output(obj: dict[str, Any], teacher: bool) -> tuple[Distribution | None, Generation | None]:
    """Exactly one of probs, logits and generation."""
    present = [name for name in ("probs", "logits", "generation") if name in obj]
    if len(present) != 1:
        raise ContractError("probs_or_logits", "exactly one of probs, logits or generation is required")
    if present[0] == "generation":
        return None, decode_generation(obj, teacher)
    return _distribution(obj), None


def _distribution(obj: dict[str, Any]) -> Distribution:
    has_probs, has_logits = "probs" in obj, "logits" in obj
    if has_probs == has_logits:
        raise ContractError("probs_or_logits", "exactly one of probs or logits is required")
    if has_logits:
        logits = _number_array(obj, "logits")
        shifted = logits - logits.max()
        log_probs = shifted - math.log(float(np.exp(shifted).sum()))
        return Distribution(np.exp(log_probs), log_probs)
    probs = _number_array(obj, "probs")
    if (probs < 0).any():
        raise ContractError("negative_probability", "probs contains a negative value")
    total = float(probs.sum())
    if abs(total - 1.0) > PROB_SUM_TOLERANCE:
        raise ContractError("probs_not_normalised", f"probs sum to {total:.6g}, not 1 within {PROB_SUM_TOLERANCE}")
    return Distribution(probs / total, None)


def _label(obj: dict[str, Any], required: bool) -> int | None:
    value = obj.get("label")
    if value is None:
        if required:
            raise ContractError("missing_field", "label is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ContractError("wrong_type", f"label must be an integer class index, got {type(value).__name__}")
    if value < 0 or value >= MAX_CLASSES:
        raise ContractError("label_out_of_range", f"label {value} is not a class index")
    return value


def _features(obj: dict[str, Any]) -> Features | None:
    features = obj.get("features")
    if features is None:
        return None
    if not isinstance(features, dict):
        raise ContractError("wrong_type", "features must be an object of name -> number or string")
    if len(features) > MAX_FEATURES:
        raise ContractError("too_many_features", f"features has {len(features)} entries, the limit is {MAX_FEATURES}")
    out: Features = {}
    isfinite = math.isfinite
    for name, value in features.items():
        if not 0 < len(name) <= MAX_STRING_CHARS or name[0] == "_":
            raise ContractError("bad_feature_name",
                                f"feature {name[:40]!r}: names have 1..{MAX_STRING_CHARS} characters, not starting with _")
        kind = type(value)
        if kind is float:
            if not isfinite(value):
                raise ContractError("not_finite", f"feature {name!r} is not finite")
            out[name] = value
        elif kind is int:
            out[name] = float(value)
        elif kind is str:
            if len(value) > MAX_STRING_CHARS:
                raise ContractError("string_too_long", f"feature {name!r} value is longer than {MAX_STRING_CHARS}")
            out[name] = value
        else:
            raise ContractError("wrong_type", f"feature {name!r} must be a number or a string")
    return out


def decode_prediction(raw: bytes | str | dict[str, Any]) -> Prediction:
    obj = _load(raw)
    _check_fields(obj, PREDICTION_FIELDS)
    request_id = _string(obj, "request_id")
    model = _string(obj, "model")
    student_version = _string(obj, "student_version")
    ts_ms = parse_ts(obj.get("ts"))
    dist, generation = _output(obj, teacher=False)
    latency = obj.get("latency_ms")
    if latency is not None:
        if isinstance(latency, bool) or not isinstance(latency, int | float) or not math.isfinite(latency) or latency < 0:
            raise ContractError("bad_latency", "latency_ms must be a finite number >= 0")
        latency = float(latency)
    label = _label(obj, required=False)
    if label is not None and dist is None:
        raise ContractError("generative_mismatch", "a generative prediction carries no label")
    if label is not None and dist is not None and label >= dist.n_classes:
        raise ContractError("label_out_of_range", f"label {label} but only {dist.n_classes} classes")
    audit = obj.get("audit")
    if audit is not None:
        if audit not in AUDIT_VALUES:
            raise ContractError("bad_audit", f"audit must be one of {AUDIT_VALUES}, got {str(audit)[:40]!r}")
        if label is None and generation is None:
            raise ContractError("missing_field", "label is required on an audit record")
    assert request_id is not None and model is not None and student_version is not None
    return Prediction(
        request_id=request_id,
        model=model,
        student_version=student_version,
        ts_ms=ts_ms,
        dist=dist,
        latency_ms=latency,
        features=_features(obj),
        label=label,
        audit=audit,
        segment=_string(obj, "segment", required=False),
        generation=generation,
        prompt_tokens=_prompt_tokens(obj, generation is not None),
    )


def _prompt_tokens(obj: dict[str, Any], generative: bool) -> list[int] | None:
    value = obj.get("prompt_tokens")
    if value is None:
        return None
    if not generative:
        raise ContractError("generative_mismatch", "prompt_tokens belong to a generative prediction")
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_PROMPT_TOKENS:
        raise ContractError("bad_generation", f"prompt_tokens must be an array of 1..{MAX_PROMPT_TOKENS} token ids")
    return _int_array(value, "prompt_tokens").tolist()


def decode_teacher(raw: bytes | str | dict[str, Any]) -> TeacherReplay:
    obj = _load(raw)
    _check_fields(obj, TEACHER_FIELDS)
    request_id = _string(obj, "request_id")
    model = _string(obj, "model")
    teacher_version = _string(obj, "teacher_version")
    assert request_id is not None and model is not None and teacher_version is not None
    ts_ms = parse_ts(obj.get("ts"))
    dist, generation = _output(obj, teacher=True)
    return TeacherReplay(request_id, model, teacher_version, ts_ms, dist, generation)


def decode_label(raw: bytes | str | dict[str, Any]) -> Label:
    obj = _load(raw)
    _check_fields(obj, LABEL_FIELDS)
    request_id = _string(obj, "request_id")
    model = _string(obj, "model")
    label = _label(obj, required=True)
    assert request_id is not None and model is not None and label is not None
    return Label(request_id, model, label, parse_ts(obj.get("ts")))


DECODERS = {"prediction": decode_prediction, "teacher": decode_teacher, "label": decode_label}
