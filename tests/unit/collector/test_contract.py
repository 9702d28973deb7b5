"""Contract v1: what is accepted, what is rejected and with which reason, and the JSON Schemas agree."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import jsonschema
import numpy as np
import orjson
import pytest

from kdwatch.collector.contract import decode_label, decode_prediction, decode_teacher, parse_ts
from kdwatch.errors import ContractError

TS = 1_795_000_000_000
PREDICTION = {"request_id": "r1", "model": "m", "student_version": "s1", "ts": TS, "probs": [0.7, 0.2, 0.1]}


def schema(name: str) -> dict[str, Any]:
    return json.loads(resources.files("kdwatch").joinpath(f"schemas/{name}.json").read_text())


def with_(**changes: Any) -> dict[str, Any]:
    out = {**PREDICTION, **changes}
    return {k: v for k, v in out.items() if v is not DROP}


DROP = object()
GENERATION = {"tokens": [5, 9, 2], "logprobs": [-0.1, -1.5, -0.02]}

VALID = [
    ("a minimal prediction", with_()),
    ("logits instead of probs", with_(probs=DROP, logits=[2.0, 1.0, -3.0])),
    ("an RFC 3339 time", with_(ts="2026-11-18T11:06:40Z")),
    ("an RFC 3339 time with an offset", with_(ts="2026-11-18T12:06:40.123+01:00")),
    ("probabilities off by less than 1e-3", with_(probs=[0.7, 0.2, 0.1005])),
    ("all optional fields", with_(latency_ms=12.5, features={"a": 1, "b": "x"}, label=2, segment="eu", v=1)),
    ("an audit record", with_(audit="member", label=0)),
    ("a generative prediction", with_(probs=DROP, generation=GENERATION)),
    ("a generative audit record", with_(probs=DROP, audit="nonmember", generation=GENERATION)),
]

INVALID = [
    ("no model", with_(model=DROP), "missing_field"),
    ("a numeric model", with_(model=3), "wrong_type"),
    ("an empty request id", with_(request_id=""), "empty_string"),
    ("a 257-character version", with_(student_version="v" * 257), "string_too_long"),
    ("both probs and logits", with_(logits=[1.0, 2.0, 3.0]), "probs_or_logits"),
    ("neither probs nor logits", with_(probs=DROP), "probs_or_logits"),
    ("one class", with_(probs=[1.0]), "bad_class_count"),
    ("a string in probs", with_(probs=[0.5, "0.5"]), "wrong_type"),
    ("a negative probability", with_(probs=[1.2, -0.2]), "negative_probability"),
    ("probabilities summing to 0.9", with_(probs=[0.5, 0.4]), "probs_not_normalised"),
    ("seconds instead of milliseconds", with_(ts=1_795_000_000), "timestamp_out_of_range"),
    ("a time without offset", with_(ts="2026-11-18T09:46:40"), "invalid_timestamp"),
    ("a boolean time", with_(ts=True), "wrong_type"),
    ("a label beyond the classes", with_(label=3), "label_out_of_range"),
    ("a fractional label", with_(label=1.5), "wrong_type"),
    ("an audit record without label", with_(audit="member"), "missing_field"),
    ("an unknown audit value", with_(audit="maybe", label=0), "bad_audit"),
    ("a negative latency", with_(latency_ms=-3), "bad_latency"),
    ("a boolean feature", with_(features={"a": True}), "wrong_type"),
    ("a reserved feature name", with_(features={"_confidence": 1.0}), "bad_feature_name"),
    ("an unknown field", with_(latency=3), "unknown_field"),
    ("version 2", with_(v=2), "unsupported_version"),
    ("probs and a generation", with_(generation=GENERATION), "probs_or_logits"),
    ("a generation without logprobs", with_(probs=DROP, generation={"tokens": [1]}), "bad_generation"),
    ("a positive log-probability", with_(probs=DROP, generation={"tokens": [1], "logprobs": [0.5]}), "bad_generation"),
    ("a negative token id", with_(probs=DROP, generation={"tokens": [-1], "logprobs": [-0.5]}), "wrong_type"),
    ("a label on a generative prediction", with_(probs=DROP, label=1, generation=GENERATION), "generative_mismatch"),
]


@pytest.mark.parametrize(("case", "event"), VALID, ids=[c for c, _ in VALID])
def test_a_valid_prediction_is_accepted_by_decoder_and_schema(case: str, event: dict[str, Any]) -> None:
    decoded = decode_prediction(orjson.dumps(event))
    assert decoded.request_id == "r1"
    if decoded.generation is not None:
        assert decoded.dist is None and decoded.generation.length == 3
    else:
        assert decoded.dist is not None and abs(decoded.dist.probs.sum() - 1.0) < 1e-12
    jsonschema.validate(event, schema("prediction"))


@pytest.mark.parametrize(("case", "event", "reason"), INVALID, ids=[c for c, _, _ in INVALID])
def test_an_invalid_prediction_is_rejected_with_its_reason(case: str, event: dict[str, Any], reason: str) -> None:
    with pytest.raises(ContractError) as info:
        decode_prediction(orjson.dumps(event))
    assert info.value.reason == reason
    assert str(info.value)


SCHEMA_CHECKABLE = {"missing_field", "wrong_type", "empty_string", "string_too_long", "probs_or_logits",
                    "bad_class_count", "negative_probability", "timestamp_out_of_range", "bad_audit", "bad_latency",
                    "bad_feature_name", "unknown_field", "unsupported_version", "bad_generation", "generative_mismatch"}


@pytest.mark.parametrize(("case", "event", "reason"), [c for c in INVALID if c[2] in SCHEMA_CHECKABLE],
                         ids=[c[0] for c in INVALID if c[2] in SCHEMA_CHECKABLE])
def test_the_json_schema_rejects_what_the_decoder_rejects(case: str, event: dict[str, Any], reason: str) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(event, schema("prediction"))


def test_logits_become_an_exact_log_softmax() -> None:
    decoded = decode_prediction(orjson.dumps(with_(probs=DROP, logits=[1000.0, 0.0])))
    assert decoded.dist.log_probs is not None
    assert decoded.dist.log_probs[1] == pytest.approx(-1000.0)
    assert decoded.dist.probs[0] == 1.0


def test_probabilities_are_renormalised() -> None:
    decoded = decode_prediction(orjson.dumps(with_(probs=[0.7, 0.2, 0.1008])))
    assert decoded.dist.probs.sum() == pytest.approx(1.0, abs=1e-15)
    assert np.all(decoded.dist.probs > 0)


def test_teacher_and_label_decode_and_match_their_schemas() -> None:
    teacher = {"request_id": "r1", "model": "m", "teacher_version": "t1", "ts": TS, "logits": [1.0, 2.0, 3.0]}
    label = {"request_id": "r1", "model": "m", "label": 2, "ts": "2026-11-18T11:06:40Z"}
    assert decode_teacher(orjson.dumps(teacher)).dist.n_classes == 3
    assert decode_label(orjson.dumps(label)).ts_ms == TS
    jsonschema.validate(teacher, schema("teacher"))
    jsonschema.validate(label, schema("label"))
    with pytest.raises(ContractError) as info:
        decode_label(orjson.dumps({**label, "label": None}))
    assert info.value.reason == "missing_field"


def test_oversized_values_and_bad_bytes_are_rejected() -> None:
    with pytest.raises(ContractError) as info:
        decode_prediction(b"{" + b" " * (1024 * 1024) + b"}")
    assert info.value.reason == "too_large"
    with pytest.raises(ContractError) as info:
        decode_prediction(b'{"request_id": "\xff"}')
    assert info.value.reason == "invalid_utf8"


def test_rfc3339_and_epoch_milliseconds_name_the_same_instant() -> None:
    assert parse_ts("2026-11-18T11:06:40Z") == parse_ts(TS) == TS


def test_every_reason_in_the_code_is_listed_for_the_exporter() -> None:
    """Each reason code the collector can count (a ContractError, a dead letter, a counter) is in DEAD_LETTER_REASONS."""
    import re
    from pathlib import Path

    from kdwatch.collector.records import DEAD_LETTER_REASONS

    pattern = re.compile(r'(?:ContractError|reject|DeadLetter)\((?:"(?:prediction|teacher|label)", )?[^"\n]*"([a-z0-9_]+)"'
                         r'|counters\[\([a-z_"]+, "([a-z0-9_]+)"\)\]'
                         r'|reason = "([a-z0-9_]+)" if .* else "([a-z0-9_]+)"')
    found = set()
    for path in (Path(__file__).resolve().parents[3] / "collector").glob("*.py"):
        for match in pattern.finditer(path.read_text()):
            found |= {g for g in match.groups() if g}
    assert {"invalid_json", "invalid_utf8", "late", "unmatched", "missing_field"} <= found  # the scan itself works
    assert found - {"valid", "duplicate"} <= set(DEAD_LETTER_REASONS), found - set(DEAD_LETTER_REASONS)
