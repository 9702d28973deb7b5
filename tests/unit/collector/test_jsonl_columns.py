"""JSONL through the columnar engine equals the record path on arbitrary lines (hypothesis)."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kdwatch.analyzer.window import window_result
from kdwatch.collector import column_rules, columns, parquet_io
from kdwatch.collector.columnar import analyze_columnar
from tests.record_joiner.offline import record_analyze
from tests.unit.collector.test_columnar import POISON_LINES

T0 = 1_795_000_000_000
ODD = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.floats(allow_nan=False), st.integers(-3, 3),
                st.lists(st.integers(0, 2), max_size=2))


VALID: dict[str, st.SearchStrategy[Any]] = {
    "request_id": st.integers(0, 30).map(lambda i: f"r{i}"),
    "model": st.sampled_from(["m", "n"]),
    "student_version": st.just("s1"),
    "teacher_version": st.just("t1"),
    # 20 s of event time with 20 s of grace: no window closes mid-stream, so ids never come back after one did
    "ts": st.one_of(st.integers(T0, T0 + 20_000), st.just("2026-11-18T11:06:41Z")),
    "probs": st.sampled_from([[0.5, 0.5], [0.2, 0.8], [1, 0]]),
    "logits": st.lists(st.floats(-5, 5), min_size=2, max_size=2),
    "label": st.integers(0, 1),
    "latency_ms": st.floats(0, 100),
    "segment": st.sampled_from(["eu", "us"]),
    "features": st.fixed_dictionaries({"f": st.floats(-3, 3)}),
    "v": st.just(1),
}
REQUIRED = {"prediction": ["request_id", "model", "student_version", "ts", "probs"],
            "teacher": ["request_id", "model", "teacher_version", "ts", "probs"],
            "label": ["request_id", "model", "ts", "label"]}
OPTIONAL = {"prediction": ["label", "latency_ms", "segment", "features", "v"], "teacher": ["v"], "label": ["v"]}


@st.composite
def _record(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    """A valid record, one time in four with one field changed to an odd value or removed."""
    record = {f: draw(VALID[f]) for f in REQUIRED[kind]}
    for f in OPTIONAL[kind]:
        if draw(st.integers(0, 3)) == 0:
            record[f] = draw(VALID[f])
    if draw(st.integers(0, 3)) == 0:
        field = draw(st.sampled_from(sorted({*REQUIRED[kind], *OPTIONAL[kind], "logits", "audit", "x"})))
        if draw(st.booleans()):
            record.pop(field, None)
        else:
            record[field] = draw(ODD)
    return record


def _line(kind: str) -> st.SearchStrategy[bytes]:
    raw = st.sampled_from([b"not json", b"[1]", b'{"ts": NaN}', b"{}", b'{"request_id": "a\xff"}',
                           *(line for line in POISON_LINES if len(line) < 1000)])
    return st.one_of(*[_record(kind).map(orjson.dumps)] * 10, raw)


def _results(windows: dict[Any, Any]) -> dict[Any, Any]:
    out = {}
    for key, state in windows.items():
        result = window_result(key.model, key.student_version, key.window_start, 10_000, state, None)
        out[key] = {k: v for k, v in result.items() if not (isinstance(v, float) and math.isnan(v))}
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.fixed_dictionaries({kind: st.lists(_line(kind), max_size=40) for kind in ("prediction", "teacher", "label")}),
       rows=st.sampled_from([3, 16, 65_536]))
def test_any_lines_give_the_record_paths_windows_and_counters(tmp_path_factory: pytest.TempPathFactory,
                                                               lines: dict[str, list[bytes]], rows: int) -> None:
    directory = tmp_path_factory.mktemp("jsonl")
    paths = {}
    for kind, body in lines.items():
        paths[kind] = directory / f"{kind}.jsonl"
        paths[kind].write_bytes(b"".join(line + b"\n" for line in body))
    w1, c1 = record_analyze(paths["prediction"], paths["teacher"], paths["label"], window_ms=10_000, grace_ms=20_000)
    saved = [(m, m.BATCH_ROWS) for m in (columns, column_rules, parquet_io)]
    try:
        for module, _rows in saved:
            module.BATCH_ROWS = rows
        import kdwatch.collector.jsonl_columns as jc

        jc.BATCH_ROWS = rows
        w2, c2 = analyze_columnar(paths["prediction"], paths["teacher"], paths["label"], window_ms=10_000, grace_ms=20_000)
    finally:
        for module, value in saved:
            module.BATCH_ROWS = value
        jc.BATCH_ROWS = columns.BATCH_ROWS
    valid = sum(v for (_kind, reason), v in c1.items() if reason == "valid")
    event(f"valid records: {valid > 0}, rejected ones: {sum(c1.values()) > valid}")
    assert {k: v for k, v in c1.items() if v} == {k: v for k, v in c2.items() if v}
    assert _results(w1) == _results(w2)
