"""The columnar (Parquet) offline path gives the per-record path's windows and counters on the same events."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdwatch.analyzer.window import MAX_SEGMENTS, OTHER_SEGMENT, window_result
from kdwatch.collector import column_rules, columns, parquet_io
from kdwatch.collector.columnar import analyze_columnar
from kdwatch.collector.offline import analyze_files, build_references, load_reference
from kdwatch.collector.parquet_io import convert_jsonl, load_reference_parquet
from kdwatch.errors import ContractError, SchemaError
from kdwatch.generator import TrafficSpec, generate
from tests.record_joiner.offline import record_analyze

START = 1_795_000_000_000


def _batch_rows(monkeypatch: pytest.MonkeyPatch, rows: int) -> None:
    """Every Parquet reader of the columnar path reads batches of ``rows``."""
    for module in (columns, column_rules, parquet_io):
        monkeypatch.setattr(module, "BATCH_ROWS", rows)


def write_jsonl(directory: Path, spec: TrafficSpec, n: int, extra: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Path]:
    paths = {kind: directory / f"{kind}.jsonl" for kind in ("prediction", "teacher", "label")}
    handles = {kind: path.open("wb") for kind, path in paths.items()}
    for kind, _rid, value in generate(spec, n):
        handles[kind].write(value + b"\n")
    for kind, rows in (extra or {}).items():
        for row in rows:
            handles[kind].write(orjson.dumps(row) + b"\n")
    for handle in handles.values():
        handle.close()
    return paths


def to_parquet(paths: dict[str, Path]) -> dict[str, Path]:
    out = {}
    for kind, path in paths.items():
        target = path.with_suffix(".parquet")
        convert_jsonl(path, target, kind)
        out[kind] = target
    return out


def results(windows: dict[Any, Any], refs: dict[str, Any], window_ms: int) -> dict[Any, dict[str, Any]]:
    return {key: window_result(key.model, key.student_version, key.window_start, window_ms, state, refs.get(key.model))
            for key, state in windows.items()}


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal, floats to 1e-9 relative (numpy's vectorised log may differ from a scalar one in the last bit)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def compare(paths: dict[str, Path], parquet: dict[str, Path], reference: Path | None, window_ms: int = 60_000,
            grace_ms: int = 600_000) -> tuple[dict[Any, Any], dict[tuple[str, str], int]]:
    """The record path on JSONL against the columnar engine on JSONL and on Parquet (references likewise)."""
    refs = record_reference(reference) if reference is not None else {}
    for columnar_reference in ([reference, reference.with_suffix(".parquet")] if reference is not None else []):
        assert {m: r.to_dict() for m, r in load_reference(columnar_reference).items()} == \
            {m: r.to_dict() for m, r in refs.items()}
    w1, c1 = record_analyze(paths["prediction"], paths["teacher"], paths["label"], window_ms=window_ms, grace_ms=grace_ms,
                           references=refs)
    r1 = results(w1, refs, window_ms)
    for source in (paths, parquet):
        w2, c2 = analyze_columnar(source["prediction"], source["teacher"], source["label"], window_ms=window_ms,
                                  grace_ms=grace_ms, references=refs)
        assert c1 == c2
        assert_same(r1, results(w2, refs, window_ms), "windows")
    return r1, c1


def record_reference(path: Path) -> dict[str, Any]:
    """A JSONL reference through the record path's builder."""
    with path.open("rb") as handle:
        return {model: reference for model, (reference, _n) in build_references(handle).items()}


@pytest.mark.parametrize("logits", [False, True])
def test_generated_traffic_gives_the_same_windows(tmp_path: Path, logits: bool) -> None:
    spec = TrafficSpec(seed=3, events_per_second=40.0, teacher_rate=0.3, label_rate=0.3, audit_rate=0.05,
                       disagreement=0.1, logits=logits)
    paths = write_jsonl(tmp_path, spec, 6_000)
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    reference = write_jsonl(ref_dir, TrafficSpec(seed=4, feature_shift=0.2), 3_000)["prediction"]
    convert_jsonl(reference, reference.with_suffix(".parquet"), "prediction")
    r, counters = compare(paths, to_parquet(paths), reference)
    assert len(r) >= 3
    total = sum(w["n"] for w in r.values())
    assert total == 6_000
    assert sum(w["n_joined"] for w in r.values()) > 1_000
    assert any(w["mia"] for w in r.values())
    assert all(w["psi"]["f0"] is not None for w in r.values())
    assert counters[("prediction", "valid")] > 6_000


def test_two_models_interleaved_give_the_same_windows(tmp_path: Path) -> None:
    import heapq

    streams = [generate(TrafficSpec(model=name, seed=seed, events_per_second=30.0, teacher_rate=0.4, label_rate=0.2,
                                    n_classes=k, logits=seed == 2), 3_000)
               for name, seed, k in (("a", 1, 10), ("b", 2, 4))]
    paths = {kind: tmp_path / f"{kind}.jsonl" for kind in ("prediction", "teacher", "label")}
    handles = {kind: path.open("wb") for kind, path in paths.items()}
    for kind, _rid, value in heapq.merge(*streams, key=lambda record: orjson.loads(record[2])["ts"]):
        handles[kind].write(value + b"\n")
    for handle in handles.values():
        handle.close()
    r, _counters = compare(paths, to_parquet(paths), None)
    assert {key.model for key in r} == {"a", "b"}
    assert sum(w["n"] for key, w in r.items() if key.model == "b") == 3_000


def test_late_and_unmatched_records_count_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small batches so both paths close windows as they go; 10 s windows, 20 s grace.
    _batch_rows(monkeypatch, 500)
    spec = TrafficSpec(seed=5, events_per_second=20.0, teacher_rate=0.5, label_rate=0.0)
    old = START + 1_000
    extra = {
        "prediction": [{"request_id": "late-1", "model": spec.model, "student_version": "s1", "ts": old,
                        "probs": [0.5, 0.5] + [0.0] * 8}],
        "teacher": [{"request_id": "nobody", "model": spec.model, "teacher_version": "t1", "ts": START + 290_000,
                     "probs": [1.0] + [0.0] * 9},
                    {"request_id": "late-t", "model": spec.model, "teacher_version": "t1", "ts": old,
                     "probs": [1.0] + [0.0] * 9}],
    }
    paths = write_jsonl(tmp_path, spec, 6_000, extra)
    _r, counters = compare(paths, to_parquet(paths), None, window_ms=10_000, grace_ms=20_000)
    assert counters[("prediction", "late")] == 1
    assert counters[("teacher", "late")] == 1
    assert counters[("teacher", "unmatched")] == 1


def test_many_small_chunks_and_rows_out_of_order_give_the_same_windows(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Batches of 40 rows: predictions stay open across many chunks (more than MAX_CHUNKS: they are
    # joined), replays find them in older chunks, and windows close part of a chunk at a time.
    # Rows shuffled within blocks of 30: windows are not contiguous within a chunk.
    _batch_rows(monkeypatch, 40)
    spec = TrafficSpec(seed=11, events_per_second=10.0, teacher_rate=0.5, label_rate=0.3, audit_rate=0.02)
    paths = write_jsonl(tmp_path, spec, 2_500)
    rng = np.random.default_rng(11)
    for path in paths.values():
        lines = path.read_bytes().splitlines(keepends=True)
        blocks = [lines[i:i + 30] for i in range(0, len(lines), 30)]
        path.write_bytes(b"".join(b"".join(rng.permutation(np.array(block, dtype=object)).tolist()) for block in blocks))
    r, counters = compare(paths, to_parquet(paths), None, window_ms=10_000, grace_ms=60_000)
    assert sum(w["n"] for w in r.values()) + counters.get(("prediction", "late"), 0) == 2_500
    assert sum(w["n_joined"] for w in r.values()) > 1_000


def test_results_do_not_depend_on_batch_sizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Labels come up to ~100 s after their prediction with 10 s windows and 60 s grace: some join,
    # some are unmatched. The watermark moves after every record on both offline paths, so neither
    # the record joiner's end_batch cadence nor the columnar engine's batch size changes which.
    from tests.record_joiner import offline

    spec = TrafficSpec(seed=11, events_per_second=10.0, teacher_rate=0.5, label_rate=0.3)
    paths = write_jsonl(tmp_path, spec, 2_500)
    parquet = to_parquet(paths)
    runs = []
    for records, rows in ((5_000, 65_536), (7, 40), (333, 1_000)):
        monkeypatch.setattr(offline, "BATCH", records)
        _batch_rows(monkeypatch, rows)
        for source, engine in ((paths, record_analyze), (paths, analyze_files), (parquet, analyze_files)):
            windows, counters = engine(source["prediction"], source["teacher"], source["label"], window_ms=10_000,
                                       grace_ms=60_000)
            runs.append((counters, results(windows, {}, 10_000)))
    assert 0 < runs[0][0][("label", "unmatched")] < runs[0][0][("label", "valid")]
    for counters, r in runs[1:]:
        assert counters == runs[0][0]
        assert_same(r, runs[0][1])


def test_the_merge_of_files_out_of_order_is_the_heap_merge(tmp_path: Path) -> None:
    # The record joiner's merged_events merges the files with a heap; the columnar path orders rows by
    # their file's running maximum of ts (then input, then row): the same order, also when a file is
    # not sorted by ts.
    from tests.record_joiner.offline import merged_events

    rng = np.random.default_rng(3)
    for trial in range(30):
        stamps = {kind: (START + rng.integers(0, 40, rng.integers(0, 12)) * 1000).tolist()
                  for kind in ("prediction", "teacher", "label")}
        paths = {}
        for kind, values in stamps.items():
            paths[kind] = tmp_path / f"{trial}-{kind}.jsonl"
            paths[kind].write_bytes(b"".join(orjson.dumps({"request_id": f"{kind}-{i}", "ts": ts}) + b"\n"
                                             for i, ts in enumerate(values)))
        heap = [orjson.loads(raw)["request_id"] for _kind, raw, _obj, _end in merged_events(**{
            "predictions": paths["prediction"], "teacher": paths["teacher"], "labels": paths["label"]}) if raw]
        rows = [(int(np.maximum.accumulate(values)[i]), order, i, f"{kind}-{i}")
                for order, (kind, values) in enumerate(stamps.items()) for i in range(len(values))]
        assert heap == [name for *_key, name in sorted(rows)]


def test_batches_read_ahead_keep_their_order_errors_and_stop_with_the_reader() -> None:
    import threading
    import time

    def batches() -> Iterator[int]:
        yield 1
        yield 2
        raise SchemaError("p.parquet: column 'colour' is not a field")

    ahead = parquet_io.prefetch(batches())
    assert [next(ahead), next(ahead)] == [1, 2]
    with pytest.raises(SchemaError, match="colour"):
        next(ahead)
    abandoned = parquet_io.prefetch(iter(range(1_000_000)))
    assert next(abandoned) == 0
    abandoned.close()
    deadline = time.monotonic() + 5
    while any(t.name == "kdwatch-read" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "kdwatch-read" for t in threading.enumerate())


def test_join_keys_depend_on_the_string_alone() -> None:
    ids = ["a", "", "fraud-distil-0-17", "x" * 8, "x" * 9, "é" * 11, "fraud-distil-0-5", "y" * 40]
    alone = {s: int(columns.string_keys(pa.array([s]))[0]) for s in ids}
    together = columns.string_keys(pa.array(ids))
    assert [alone[s] for s in ids] == together.tolist()
    # Slices (an offset into shared buffers), large strings and nulls among them change nothing.
    assert columns.string_keys(pa.array(["zz", *ids]).slice(1)).tolist() == together.tolist()
    assert columns.string_keys(pa.array(ids, type=pa.large_string())).tolist() == together.tolist()
    with_null = columns.string_keys(pa.array([None, *ids]))
    assert with_null[1:].tolist() == together.tolist() and with_null[0] == alone[""]
    assert len(set(together.tolist())) == len(ids)
    many = columns.string_keys(pa.array([f"req-{i}" for i in range(200_000)]))
    assert np.unique(many).size == 200_000


@pytest.mark.parametrize("batch", [65_536, 97])
def test_request_ids_sharing_a_join_key_are_told_apart_by_their_strings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                         batch: int) -> None:
    _batch_rows(monkeypatch, batch)
    spec = TrafficSpec(seed=8, events_per_second=40.0, teacher_rate=0.5, label_rate=0.3)
    paths = write_jsonl(tmp_path, spec, 2_000)
    with_retries(paths, 0.05, 8)
    parquet = to_parquet(paths)
    w1, c1 = record_analyze(paths["prediction"], paths["teacher"], paths["label"])
    # A key of 12 bits: many different request_ids share one (in a chunk, across chunks, waiting and open).
    monkeypatch.setattr(column_rules, "string_keys",
                        lambda values: np.array([hash(v) & 0xFFF for v in values.to_pylist()], dtype=np.uint64))
    for source in (paths, parquet):
        w2, c2 = analyze_files(source["prediction"], source["teacher"], source["label"])
        assert c1 == c2
        assert_same(results(w1, {}, 60_000), results(w2, {}, 60_000))


BAD_PREDICTIONS: list[tuple[str, dict[str, Any]]] = [
    ("empty_string", {"request_id": ""}),
    ("string_too_long", {"model": "m" * 300}),
    ("timestamp_out_of_range", {"ts": 1_000}),
    ("probs_or_logits", {"logits": [0.0, 1.0] * 5}),
    ("bad_class_count", {"probs": [1.0]}),
    ("negative_probability", {"probs": [1.5, -0.5] + [0.0] * 8}),
    ("probs_not_normalised", {"probs": [0.5, 0.4] + [0.0] * 8}),
    ("bad_latency", {"latency_ms": -1.0}),
    ("label_out_of_range", {"label": 12}),
    ("bad_audit", {"audit": "maybe", "label": 1}),
    ("missing_field", {"audit": "member"}),
    ("string_too_long", {"segment": "s" * 300}),
    ("string_too_long", {"features": {"f0": 1.0, "f1": 2.0, "f2": 3.0, "f3": 4.0, "f4": "x" * 300}}),
]


def test_invalid_rows_are_rejected_with_the_decoders_reasons(tmp_path: Path) -> None:
    base = {"model": "m", "student_version": "s1", "probs": [0.1] * 10, "latency_ms": 3.0,
            "features": {"f0": 1.0, "f1": 2.0, "f2": 3.0, "f3": 4.0, "f4": "a"}, "segment": "eu"}
    rows = []
    for i, (_reason, change) in enumerate(BAD_PREDICTIONS):
        row = {**base, "request_id": f"bad-{i}", "ts": START + i * 1000, **change}
        rows.append(row)
    good = [{**base, "request_id": f"ok-{i}", "ts": START + i * 1000} for i in range(20)]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in good + rows))
    schema = pa.schema([("request_id", pa.string()), ("model", pa.string()), ("student_version", pa.string()),
                        ("ts", pa.int64()), ("probs", pa.list_(pa.float64())), ("logits", pa.list_(pa.float64())),
                        ("latency_ms", pa.float64()),
                        ("features", pa.struct([(f"f{j}", pa.float64()) for j in range(4)] + [("f4", pa.string())])),
                        ("label", pa.int64()), ("audit", pa.string()), ("segment", pa.string())])
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(good + rows, schema=schema), parquet)
    w1, c1 = record_analyze(jsonl)
    w2, c2 = analyze_columnar(parquet)
    w3, c3 = analyze_columnar(jsonl)
    assert c3 == c1
    assert_same(results(w1, {}, 60_000), results(w3, {}, 60_000))
    assert c1 == c2
    expected: dict[str, int] = {}
    for reason, _change in BAD_PREDICTIONS:
        expected[reason] = expected.get(reason, 0) + 1
    assert {r: c for (k, r), c in c2.items() if k == "prediction" and r != "valid"} == expected
    assert_same(results(w1, {}, 60_000), results(w2, {}, 60_000))
    assert sum(s.n_rejected for s in w2.values()) == len(BAD_PREDICTIONS) - 2  # two name no readable window


def test_a_label_is_checked_against_its_own_rows_class_count(tmp_path: Path) -> None:
    rows = [{"request_id": "wide", "model": "a", "student_version": "s", "ts": START, "probs": [0.1] * 10, "label": 7},
            {"request_id": "narrow", "model": "b", "student_version": "s", "ts": START, "probs": [0.5, 0.5], "label": 7},
            {"request_id": "fine", "model": "b", "student_version": "s", "ts": START, "probs": [0.5, 0.5], "label": 1}]
    jsonl, parquet = tmp_path / "p.jsonl", tmp_path / "p.parquet"
    jsonl.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    w1, c1 = record_analyze(jsonl)
    w2, c2 = analyze_columnar(parquet)
    w3, c3 = analyze_columnar(jsonl)
    assert c3 == c1
    assert_same(results(w1, {}, 60_000), results(w3, {}, 60_000))
    assert c1 == c2 and c2[("prediction", "label_out_of_range")] == 1
    assert_same(results(w1, {}, 60_000), results(w2, {}, 60_000))


def test_more_segments_than_the_limit_stay_on_the_engine(tmp_path: Path) -> None:
    """Past MAX_SEGMENTS names a window counts the later ones under _other, in order of first appearance, as the joiner."""
    rng = np.random.default_rng(5)
    names = [f"seg-{i}" for i in rng.permutation(MAX_SEGMENTS + 80)]
    preds, replays = [], []
    for i in range(3 * len(names)):
        probs = rng.dirichlet(np.ones(3)).tolist()
        preds.append({"request_id": f"r{i}", "model": "m", "student_version": "s", "ts": START + i % 50,
                      "probs": probs, "segment": names[(i * 7) % len(names)], "label": int(rng.integers(0, 3))})
        if i % 2:
            replays.append({"request_id": f"r{i}", "model": "m", "teacher_version": "t", "ts": START + i % 50 + 5,
                            "probs": rng.dirichlet(np.ones(3)).tolist()})
    paths = {"prediction": tmp_path / "prediction.jsonl", "teacher": tmp_path / "teacher.jsonl", "label": tmp_path / "label.jsonl"}
    for kind, rows in (("prediction", preds), ("teacher", replays), ("label", [])):
        paths[kind].write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    r, _counters = compare(paths, to_parquet(paths), None)
    (window,) = r.values()
    assert len(window["segments"]) == MAX_SEGMENTS + 1 and window["segments"][OTHER_SEGMENT]["n"] == 3 * 80


@pytest.mark.parametrize("batch", [65_536, 64, 5])
def test_a_model_whose_class_count_changes_stays_on_the_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                batch: int) -> None:
    """A model upgraded from 3 to 4 classes mid-stream (both in some windows): the record joiner's windows and counters,
    replays of the other class count rejected as class_count_mismatch, label 3 only for the 4-class predictions."""
    _batch_rows(monkeypatch, batch)
    rng = np.random.default_rng(9)
    preds, replays, labels = [], [], []
    for i in range(1_500):
        k = 3 if i < 600 or (i < 900 and i % 2) else 4
        ts = START + 40 * i
        preds.append({"request_id": f"r{i}", "model": "m", "student_version": "s", "ts": ts,
                      "probs": rng.dirichlet(np.ones(k)).tolist(), "features": {"x": float(rng.normal())}})
        if i % 3:
            k_t = k if i % 17 else 7 - k  # every 17th: the other class count
            replays.append({"request_id": f"r{i}", "model": "m", "teacher_version": "t", "ts": ts + int(rng.integers(-500, 3_000)),
                            "probs": rng.dirichlet(np.ones(k_t)).tolist()})
        if i % 4 == 0:
            labels.append({"request_id": f"r{i}", "model": "m", "label": int(rng.integers(0, 4)), "ts": ts + 2_000})
    paths = {"prediction": tmp_path / "prediction.jsonl", "teacher": tmp_path / "teacher.jsonl", "label": tmp_path / "label.jsonl"}
    for kind, rows in (("prediction", preds), ("teacher", replays), ("label", labels)):
        paths[kind].write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    reference = ref_dir / "prediction.jsonl"
    reference.write_bytes(paths["prediction"].read_bytes())
    convert_jsonl(reference, reference.with_suffix(".parquet"), "prediction")
    analyze_files(paths["prediction"], paths["teacher"], paths["label"])
    r, counters = compare(paths, to_parquet(paths), reference)
    assert counters[("teacher", "class_count_mismatch")] > 0 and counters[("label", "label_out_of_range")] > 0
    assert sum(w["n_joined"] for w in r.values()) > 500 and all(w["psi"]["_confidence"] is not None for w in r.values())


def test_not_finite_values_are_rejected(tmp_path: Path) -> None:
    rows = [{"request_id": "a", "model": "m", "student_version": "s", "ts": START, "probs": [0.5, float("nan")],
             "features": {"x": 0.0}},
            {"request_id": "b", "model": "m", "student_version": "s", "ts": START, "probs": [0.5, 0.5],
             "features": {"x": float("inf")}},
            {"request_id": "c", "model": "m", "student_version": "s", "ts": START, "probs": [0.5, 0.5],
             "features": {"x": 1.0}}]
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    windows, counters = analyze_columnar(path)
    assert counters[("prediction", "not_finite")] == 2
    assert sum(s.n for s in windows.values()) == 1


def with_retries(paths: dict[str, Path], rate: float, seed: int) -> None:
    """Send a share of each file's records again, as an at-least-once producer does: a copy some rows later."""
    rng = np.random.default_rng(seed)
    for path in paths.values():
        lines = path.read_bytes().splitlines()
        out: list[bytes] = []
        again: list[tuple[int, bytes]] = []
        for i, line in enumerate(lines):
            out.append(line)
            if rng.random() < rate:
                again.append((i + int(rng.integers(0, 200)), line))
            while again and again[0][0] <= i:
                out.append(again.pop(0)[1])
                again.sort()
        out.extend(line for _, line in again)
        path.write_bytes(b"\n".join(out) + b"\n")


@pytest.mark.parametrize(("rate", "batch"), [(0.005, 65_536), (0.05, 700), (0.2, 97)])
def test_retried_records_are_duplicates_on_the_columnar_path_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  rate: float, batch: int) -> None:
    """At-least-once duplicates stay on the columnar path (no fallback) and count as the record joiner counts them."""
    _batch_rows(monkeypatch, batch)
    spec = TrafficSpec(seed=11, events_per_second=40.0, teacher_rate=0.5, label_rate=0.3, audit_rate=0.05)
    own = [{"request_id": f"own-{i}", "model": spec.model, "student_version": "s1", "ts": START + 25 * i,
            "probs": [0.1] * 10, "label": 2} for i in range(0, 4_000, 61)]
    paths = write_jsonl(tmp_path, spec, 4_000, {
        "prediction": own,  # predictions that carry their label, then a label record for some of them
        "label": [{"request_id": f"own-{i}", "model": spec.model, "label": 1, "ts": START + 25 * i + 500}
                  for i in range(0, 4_000, 122)]
        + [{"request_id": f"audit-{spec.model}-11-{i}", "model": spec.model, "label": 1, "ts": START + 25 * i}
           for i in range(4_000)],
        "teacher": [{"request_id": f"audit-{spec.model}-11-{i}", "model": spec.model, "teacher_version": "t1",
                     "ts": START + 25 * i, "probs": [0.1] * 10} for i in range(4_000)],
    })
    with_retries(paths, rate, seed=int(rate * 1000))
    _r, counters = compare(paths, to_parquet(paths), None, window_ms=10_000, grace_ms=20_000)
    assert counters[("prediction", "duplicate")] > 0 and counters[("teacher", "duplicate")] > 0
    assert counters[("label", "duplicate")] > 0


@pytest.mark.parametrize("batch", [65_536, 50, 7])
def test_a_request_id_used_again_after_its_window_closed_is_a_new_prediction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                            batch: int) -> None:
    """A new request under an old id stays on the engine (no fallback), with the record joiner's windows and counters."""
    _batch_rows(monkeypatch, batch)
    spec = TrafficSpec(seed=7, events_per_second=40.0, teacher_rate=0.5, label_rate=0.3)
    again = [{"request_id": f"{spec.model}-7-{i}", "model": spec.model, "student_version": "s1", "ts": START + 3_000_000 + i,
              "probs": [0.1] * 10} for i in range(10, 400, 13)]
    replays = [{"request_id": r["request_id"], "model": spec.model, "teacher_version": "t1", "ts": r["ts"] + 1_000,
                "probs": [0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05]} for r in again[::2]]
    paths = write_jsonl(tmp_path, spec, 3_000, {"prediction": again, "teacher": replays})
    r, counters = compare(paths, to_parquet(paths), None, window_ms=10_000, grace_ms=20_000)
    analyze_files(paths["prediction"], paths["teacher"], paths["label"], window_ms=10_000, grace_ms=20_000)
    late_window = [w for key, w in r.items() if key.window_start >= START + 3_000_000 - 10_000]
    assert sum(w["n"] for w in late_window) == len(again) and sum(w["n_joined"] for w in late_window) == len(replays)
    assert counters.get(("prediction", "duplicate"), 0) == 0


def test_request_ids_reused_over_and_over_stay_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A producer that reuses a few ids for every request (a session id as request_id): thousands of reuses in
    one stretch, the record joiner's windows and counters (and no recursion: the stretch is cut in a loop)."""
    rng = np.random.default_rng(3)
    preds, replays = [], []
    for i in range(12_000):
        ts = START + 50 * i
        rid = f"session-{i % 60}"  # the same 60 ids, each back every 3 s of event time (windows of 1 s, grace 1 s)
        preds.append({"request_id": rid, "model": "m", "student_version": "s", "ts": ts, "probs": rng.dirichlet(np.ones(4)).tolist()})
        if i % 3 == 0:
            replays.append({"request_id": rid, "model": "m", "teacher_version": "t", "ts": ts + int(rng.integers(0, 900)),
                            "probs": rng.dirichlet(np.ones(4)).tolist()})
    paths = {"prediction": tmp_path / "prediction.jsonl", "teacher": tmp_path / "teacher.jsonl", "label": tmp_path / "label.jsonl"}
    for kind, rows in (("prediction", preds), ("teacher", replays), ("label", [])):
        paths[kind].write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    r, counters = compare(paths, to_parquet(paths), None, window_ms=1_000, grace_ms=1_000)
    assert sum(w["n"] for w in r.values()) == 12_000 and sum(w["n_joined"] for w in r.values()) > 2_000
    assert counters.get(("prediction", "duplicate"), 0) == 0


def test_schema_errors_name_the_column(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"request_id": ["a"], "model": ["m"], "student_version": ["s"], "ts": [START],
                             "probs": [[0.5, 0.5]], "colour": ["red"]}), path)
    with pytest.raises(SchemaError, match="'colour' is not a field"):
        analyze_columnar(path)
    pq.write_table(pa.table({"request_id": ["a"], "model": ["m"], "student_version": ["s"], "ts": ["yesterday"],
                             "probs": [[0.5, 0.5]]}), path)
    with pytest.raises(SchemaError, match="column 'ts' has type string"):
        analyze_columnar(path)


def test_mixing_jsonl_and_parquet_inputs_is_refused(tmp_path: Path) -> None:
    paths = write_jsonl(tmp_path, TrafficSpec(seed=1), 100)
    parquet = to_parquet(paths)
    with pytest.raises(SchemaError, match="all JSONL or all Parquet"):
        analyze_files(paths["prediction"], parquet["teacher"], None)


def test_reference_with_an_invalid_row_fails_naming_it(tmp_path: Path) -> None:
    rows = [{"request_id": f"r{i}", "model": "m", "student_version": "s", "ts": START, "probs": [0.5, 0.5]} for i in range(3)]
    rows[2]["probs"] = [0.9, 0.9]
    path = tmp_path / "ref.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(ContractError, match="row 3: probs_not_normalised"):
        load_reference_parquet(path)


def test_timestamp_columns_are_read_as_event_time(tmp_path: Path) -> None:
    ts = np.array([START, START + 61_000], dtype="datetime64[ms]")
    table = pa.table({"request_id": ["a", "b"], "model": ["m", "m"], "student_version": ["s", "s"],
                      "ts": pa.array(ts, type=pa.timestamp("ms", tz="UTC")), "probs": [[0.5, 0.5], [0.2, 0.8]]})
    path = tmp_path / "p.parquet"
    pq.write_table(table, path)
    windows, _c = analyze_columnar(path)
    assert sorted(k.window_start for k in windows) == [START - START % 60_000, START + 61_000 - (START + 61_000) % 60_000]


def test_convert_keeps_rejected_lines_with_their_reason(tmp_path: Path) -> None:
    source = tmp_path / "p.jsonl"
    source.write_bytes(b'{"request_id": "a", "model": "m", "student_version": "s", "ts": 1795000000000, "probs": [0.5, 0.5]}\n'
                       b'not json\n'
                       b'{"request_id": "b", "model": "m", "student_version": "s", "ts": "2026-11-18T11:06:40Z", "logits": [1, 2]}\n')
    written, reasons = convert_jsonl(source, tmp_path / "p.parquet", "prediction", tmp_path / "rejected.jsonl")
    assert written == 2 and reasons == {"invalid_json": 1}
    rejected = [orjson.loads(line) for line in (tmp_path / "rejected.jsonl").read_bytes().splitlines()]
    assert rejected == [{"line": 2, "reason": "invalid_json", "message": rejected[0]["message"], "value": "not json"}]
    table = pq.read_table(tmp_path / "p.parquet")
    assert table.column("ts").to_pylist() == [1795000000000, 1795000000000]


POISON_LINES = [
    b"not json", b"[1, 2]", b"42", b'"text"', b"{", b"\xff\xfe{}",
    b'{"request_id": 7, "model": "m", "student_version": "s1", "ts": 1795000000000, "probs": [1.0]}',
    b'{"request_id": "p1", "model": "m", "student_version": "s1", "ts": "2026-11-18T11:06:41Z", "probs": [0.5, 0.5]}',
    b'{"request_id": "p2", "model": "m", "student_version": "s1", "ts": "2026-11-18T11:06:41", "probs": [0.5, 0.5]}',
    b'{"request_id": "p3", "model": "m", "student_version": "s1", "ts": 1795000001000.0, "probs": [0.5, 0.5]}',
    b'{"request_id": "p4", "model": "m", "student_version": "s1", "ts": true, "probs": [0.5, 0.5]}',
    b'{"request_id": "p5", "model": "m", "student_version": "s1", "ts": 1795000001000, "probs": [0.5, 0.5], "label": 1.0}',
    b'{"request_id": "p6", "model": "m", "student_version": "s1", "ts": 1795000001000, "probs": [0.5, 0.5], "label": null}',
    b'{"request_id": "p7", "model": "m", "student_version": null, "ts": 1795000001000, "probs": [0.5, 0.5]}',
    b'{"request_id": "p8", "model": "m", "student_version": "s1", "ts": 1795000001000, "probs": [0.5, 0.5], "x": 1}',
    b'{"request_id": "p9", "model": "m", "model": "n", "student_version": "s1", "ts": 1795000001000, "probs": [0.5, 0.5]}',
    b'{"request_id": "p10", "model": "m", "student_version": "s1", "ts": 1795000001000, "probs": [NaN, 0.5]}',
    b'{"request_id": "p11", "model": "m", "student_version": "s1", "ts": 1795000001000, "probs": [0.5, "0.5"]}',
    b'{"request_id": "p12", "model": "m", "student_version": "s1", "ts": 1795000001000, "probs": [0.5, 0.5], "features": {"_x": 1}}',
    b'{"request_id": "p13", "model": "m", "student_version": "s1", "ts": 1795000001000, "probs": [0.5, 0.5], "features": {"f": true}}',
    b'{"request_id": "p14", "model": "m", "student_version": "s1", "ts": 1795000001000, "probs": [0.5, 0.5], "features": [1]}',
    b'{"request_id": "p15", "model": "m", "student_version": "s1", "ts": 1795000001000, "probs": [0.5, 0.5], "v": 2}',
    b'{"request_id": "p16", "model": "m", "student_version": "s1", "ts": 1795000001000, "probs": [0.5, 0.5], "v": 1}',
    b'{"request_id": "p17", "model": "m", "student_version": "s1", "ts": 99999999999999999999, "probs": [0.5, 0.5]}',
    b'{"request_id": "p18", "model": "m", "student_version": "s1", "ts": 1795000001000, "probs": [0.5, 0.5], "segment": 3}',
    b'{"request_id": "p19\\u0000", "model": "m", "student_version": "s1", "ts": 1795000001000, "probs": [0.5, 0.5]}',
    b'{"request_id": "p20", "model": "m", "student_version": "s1", "ts": 1795000001000, "logits": [1, 2]}',
    b'{"request_id": "p22\xff", "model": "m", "student_version": "s1", "ts": 1795000001000, "probs": [0.5, 0.5]}',
    b'{"request_id": "p23", "model": "m\xc3\xa9", "student_version": "s1", "ts": 1795000001000, "probs": [0.5, 0.5]}',
    b'{"request_id": "p24", "model": "m", "student_version": "s1", "ts": 1795000001000, "probs": [0.5, 0.5], "v": null}',
    b'{"request_id": "p25", "model": "m", "student_version": "s1", "ts": 1795000001000, "probs": [0.5, 0.5], "logits": null}',
    b'{"request_id": "p26", "model": "m", "student_version": "s1", "ts": 1795000001000, "probs": [0.5, 0.5], "features": {"f": null}}',
    b'{"request_id": "p27", "model": "m", "student_version": "s1", "ts": 1795000001000, "probs": [null, 0.5]}',
    b'{"request_id": "p28", "model": "m", "student_version": "s1", "ts": 1795000001000, "probs": [0.5, 0.5], "latency_ms": NaN}',
    b'{"request_id": "p29", "model": "m", "student_version": "s1", "ts": 1795000001000, "probs": [0.5, 0.5], "features": {"f": -Infinity}}',
    b'{"request_id": "p30", "model": "m", "student_version": "s1", "ts": 1795000001000, "probs": [Infinity, 0.5]}',
    b'{"request_id": "p31", "model": "m", "student_version": "s1", "ts": 1795000001000, "probs": [0.5, 0.5], "segment": null}',
    b'{"request_id": "p21", "model": "m", "student_version": "s1", "ts": 1795000001000, "probs": [1, 0], "latency_ms": 3}',
    b'{"request_id": "big", "model": "m", "student_version": "s1", "ts": 1795000001000, "probs": [0.5, 0.5], "segment": "'
    + b"x" * (1024 * 1024) + b'"}',
]


@pytest.mark.parametrize("rows", [4, 65_536])
def test_jsonl_lines_of_every_kind_give_the_record_paths_reasons_and_windows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                              rows: int) -> None:
    """Poison, odd JSON and valid lines mixed: Arrow's reader where it can, the decoder line by line where it must."""
    _batch_rows(monkeypatch, rows)
    spec = TrafficSpec(seed=5, events_per_second=40.0, teacher_rate=0.5, label_rate=0.3, n_classes=2)
    paths = write_jsonl(tmp_path, spec, 600)
    lines = paths["prediction"].read_bytes().splitlines()
    for i, poison in enumerate(POISON_LINES):
        lines.insert(7 + 19 * i, poison)
    lines.insert(300, b"")  # blank lines are skipped
    paths["prediction"].write_bytes(b"\n".join(lines) + b"\n")
    labels = paths["label"].read_bytes().splitlines()
    labels[3:3] = [b'{"request_id": "q", "model": "fraud-distil", "label": "1", "ts": 1795000001000}',
                   b'{"request_id": "q", "model": "fraud-distil", "label": -1, "ts": 1795000001000}']
    paths["label"].write_bytes(b"\n".join(labels) + b"\n")
    w1, c1 = record_analyze(paths["prediction"], paths["teacher"], paths["label"], window_ms=10_000, grace_ms=20_000)
    w2, c2 = analyze_columnar(paths["prediction"], paths["teacher"], paths["label"], window_ms=10_000, grace_ms=20_000)
    assert c1 == c2
    assert_same(results(w1, {}, 10_000), results(w2, {}, 10_000))
    rejected = sum(c for (kind, reason), c in c1.items() if kind == "prediction" and reason != "valid")
    assert rejected >= 20  # some odd lines are valid (RFC 3339 ts, integer probabilities, v: 1, a null label)
    assert sum(s.n_rejected for s in w1.values()) > 5


def test_arrows_reader_takes_the_usual_lines_and_leaves_odd_ones_to_the_decoder() -> None:
    from kdwatch.collector.jsonl_columns import fast_batch

    good = [b'{"request_id": "a", "model": "m", "student_version": "s", "ts": 1795000000000, "probs": [0.5, 0.5],'
            b' "features": {"f": 1, "g": "x"}}'] * 3
    batch = fast_batch(good, "prediction")
    assert batch is not None and batch.num_rows == 3
    # Read by Arrow and meaning the same to both: nulls where null is absence, v: 2 (the rules reject it), v: 1, a NUL
    # inside a string, integer numbers, UTF-8
    arrow_reads = {b'"p31"', b'"p6"', b'"p7"', b'"p23"', b'"p15"', b'"p16"', b'"p19', b'"p20"', b'"p21"'}
    for odd in POISON_LINES:
        read = fast_batch([*good, odd], "prediction")
        assert (read is not None) == any(name in odd for name in arrow_reads), odd[:60]
    # Generative lines: the decoder checks each generation (line by line)
    assert fast_batch([b'{"request_id": "a", "model": "m", "student_version": "s", "ts": 1795000000000, '
                       b'"generation": {"tokens": [1], "logprobs": [-0.1]}}'], "prediction") is None


@pytest.mark.parametrize("rows_per_batch", [3, 64])
def test_a_feature_holding_numbers_and_strings_stays_on_the_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    rows_per_batch: int) -> None:
    """Each value binned as sent (a number by the edges, a string as a category), in one batch or across batches."""
    _batch_rows(monkeypatch, rows_per_batch)
    rows = [{"request_id": f"r{i}", "model": "m", "student_version": "s", "ts": START + i * 1000, "probs": [0.5, 0.5],
             "features": {"f": float(i % 7) if (i // 5) % 3 else ["x", "y"][i % 2], "g": i}} for i in range(60)]
    rows[7]["features"] = {}
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    reference = tmp_path / "ref.jsonl"
    reference.write_bytes(b"".join(orjson.dumps({**r, "request_id": "b" + r["request_id"]}) + b"\n" for r in rows))
    refs = record_reference(reference)
    assert refs["m"].features["f"].edges is not None or refs["m"].features["f"].categories is not None
    w1, c1 = record_analyze(jsonl, references=refs)
    w2, c2 = analyze_files(jsonl, references=refs)
    assert c1 == c2
    assert_same(results(w1, refs, 60_000), results(w2, refs, 60_000))


def test_event_times_as_rfc3339_text_stay_on_arrows_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The contract's other form of ts: Arrow reads the text, the decoder's own parser turns it into milliseconds."""
    from datetime import UTC, datetime

    from kdwatch.collector.jsonl_columns import fast_batch

    _batch_rows(monkeypatch, 500)
    spec = TrafficSpec(seed=12, events_per_second=20.0, teacher_rate=0.5, label_rate=0.3)
    paths = write_jsonl(tmp_path, spec, 2_000)
    for i, path in enumerate(paths.values()):
        rows = [orjson.loads(line) for line in path.read_bytes().splitlines()]
        for j, row in enumerate(rows):
            when = datetime.fromtimestamp(row["ts"] / 1000, tz=UTC)
            row["ts"] = when.isoformat(timespec="milliseconds").replace("+00:00", "Z" if (i + j) % 2 else "+00:00")
        if i == 0:
            rows[700]["ts"] = "yesterday"  # one refused: its batch goes line by line
        path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    lines = paths["prediction"].read_bytes().splitlines()
    assert fast_batch(lines[:500], "prediction") is not None and fast_batch(lines[500:1000], "prediction") is None
    w1, c1 = record_analyze(paths["prediction"], paths["teacher"], paths["label"])
    w2, c2 = analyze_columnar(paths["prediction"], paths["teacher"], paths["label"])
    assert c1 == c2 and c1[("prediction", "invalid_timestamp")] == 1
    assert_same(results(w1, {}, 60_000), results(w2, {}, 60_000))
