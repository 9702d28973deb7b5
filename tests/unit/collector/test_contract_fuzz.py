"""Property-based fuzzing of the decoders: any input yields an event or a ContractError, nothing else."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from kdwatch.collector.contract import DECODERS
from kdwatch.errors import ContractError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=300),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=20), children, max_size=8),
    max_leaves=30,
)
FIELDS = ["request_id", "model", "student_version", "teacher_version", "ts", "probs", "logits", "label", "latency_ms",
          "features", "audit", "segment", "v"]
near_valid = st.dictionaries(st.sampled_from(FIELDS), json_values | st.lists(st.floats(0, 1), min_size=0, max_size=12),
                             max_size=len(FIELDS))


def decode_all(raw: bytes) -> None:
    for decoder in DECODERS.values():
        try:
            decoder(raw)
        except ContractError as exc:
            assert exc.reason and exc.message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_crash_the_decoders(raw: bytes) -> None:
    decode_all(raw)


@settings(max_examples=300, deadline=None)
@given(near_valid)
def test_objects_with_contract_fields_of_any_type_never_crash_the_decoders(obj: dict[str, object]) -> None:
    decode_all(json.dumps(obj).encode())


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_any_json_value_never_crashes_the_decoders(value: object) -> None:
    decode_all(json.dumps(value).encode())
