"""History on a real local Spark (local[2], started here): the same windows, counters and backtest as `kdwatch analyze`."""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from kdwatch.analyzer.window import window_result
from kdwatch.collector.consumer import kafka_partition
from kdwatch.collector.offline import analyze_files, load_reference
from kdwatch.collector.parquet_io import convert_jsonl
from kdwatch.generator import GenerativeSpec, TrafficSpec, generate, generate_generative
from kdwatch.slo.config import parse_slo_file
from kdwatch.slo.engine import WindowInput, backtest
from tests.integration.helpers import write_jsonl
from tests.unit.collector.test_columnar import assert_same

spark_module = pytest.importorskip("kdwatch.spark", reason="installed by `make setup` (kdwatch[spark])")

SLOS = parse_slo_file({"slos": [
    {"name": "agreement", "model": "fraud-distil", "objective": 0.99, "period": "1d", "sli": {"events": {"metric": "agreement"}}},
    {"name": "tokens", "model": "support-chat", "objective": 0.99, "period": "1d", "sli": {"events": {"metric": "token_agreement"}}}]})


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    session = spark_module.session("local[2]", "kdwatch-test", **{"spark.sql.shuffle.partitions": "4"})
    yield session
    session.stop()


def adversarial(seed: int, generative: bool = True) -> list[tuple[str, str, bytes]]:
    """Three models (two classifiers, one with an incident, and a generative student), duplicates, late and unmatched
    events, a stretch out of order, poison. Without the generative student every co-partition stays on the columnar engine."""
    rng = random.Random(seed)
    sources = [
        generate(TrafficSpec(seed=seed, events_per_second=3, teacher_rate=0.4, label_rate=0.3, audit_rate=0.05,
                             disagreement=0.0), 2_500),
        generate(TrafficSpec(seed=seed + 1, model="churn-distil", events_per_second=3, n_classes=3, disagreement=0.3), 2_500)]
    if generative:
        sources.append(generate_generative(GenerativeSpec(seed=seed, events_per_second=0.5, mean_length=12, teacher_rate=0.5), 400))
    records = list(heapq.merge(*sources, key=lambda r: orjson.loads(r[2])["ts"]))
    records += [records[i] for i in rng.sample(range(len(records)), 60)]  # duplicates of every kind
    start = rng.randrange(len(records) - 200)
    block = records[start:start + 150]
    rng.shuffle(block)
    records[start:start + 150] = block  # out of order, within the grace
    first = orjson.loads(next(v for k, _r, v in records if k == "prediction"))
    records.append(("prediction", "late-1", orjson.dumps({**first, "request_id": "late-1"})))  # its window closed long ago
    records.insert(100, ("label", "nobody", orjson.dumps({"request_id": "nobody", "model": "fraud-distil", "label": 1,
                                                          "ts": first["ts"] + 5_000})))  # unmatched
    records.append(("teacher", "poison", b"{not json"))
    return records


@pytest.mark.parametrize(("partitions", "generative"), [(1, True), (3, True), (3, False)])
def test_spark_equals_analyze_field_by_field_and_the_backtest_is_identical(spark: Any, tmp_path: Path, partitions: int,
                                                                          generative: bool) -> None:
    """Spark's executors run the columnar engine per co-partition, as `analyze --partitions N` does (a generative
    student's too): the two agree field by field."""
    paths = write_jsonl(adversarial(partitions, generative), tmp_path / "events")
    reference = write_jsonl(list(generate(TrafficSpec(seed=9), 1_000)), tmp_path / "ref")["prediction"]
    refs = load_reference(reference)
    expected, expected_counters = analyze_files(paths["prediction"], paths["teacher"], paths["label"], references=refs,
                                                partitions=partitions, partitioner=kafka_partition)
    rows, counters = spark_module.collect(*spark_module.analyze(
        spark, paths["prediction"], paths["teacher"], paths["label"], references=refs, partitions=partitions))

    assert counters == expected_counters
    assert counters[("prediction", "late")] >= 1 and counters[("label", "unmatched")] >= 1
    assert counters[("prediction", "duplicate")] >= 1 and counters[("teacher", "invalid_json")] == 1
    got = {key: result for key, _state, result in rows}
    want = {key: window_result(key.model, key.student_version, key.window_start, 60_000, state, refs.get(key.model))
            for key, state in expected.items()}
    assert {k.model for k in got} == {"fraud-distil", "churn-distil", *(["support-chat"] if generative else [])}
    assert_same(got, want, "windows")
    for key, state, _result in rows:  # the states themselves merge exactly: integer sums, sketch bins
        assert state.to_dict() == expected[key].to_dict(), key

    def notes(windows: list[tuple[Any, Any, dict[str, Any]]]) -> list[dict[str, Any]]:
        return backtest(SLOS, [WindowInput(k.model, k.student_version, k.window_start + 60_000, s, r) for k, s, r in windows])

    mine = notes(rows)
    theirs = notes([(k, expected[k], want[k]) for k in sorted(expected, key=lambda k: (k.window_start, k.model, k.student_version))])
    assert mine == theirs


def test_spark_reads_parquet_files_and_dataframes(spark: Any, tmp_path: Path) -> None:
    paths = write_jsonl(adversarial(5)[:-1], tmp_path / "events")  # Parquet holds valid events only: no poison
    parquet = {}
    for kind, path in paths.items():
        parquet[kind] = path.with_suffix(".parquet")
        convert_jsonl(path, parquet[kind], kind)
    expected, _counters = analyze_files(paths["prediction"], paths["teacher"], paths["label"], partitions=2,
                                        partitioner=kafka_partition)
    rows, _ = spark_module.collect(*spark_module.analyze(spark, parquet["prediction"], parquet["teacher"], parquet["label"],
                                                         partitions=2))
    assert {k: s.to_dict() for k, s, _r in rows} == {k: s.to_dict() for k, s in expected.items()}
    # Tables come in as DataFrames (here read from the same files; a catalog table reads the same way).
    frames = {kind: spark.read.parquet(str(path)) for kind, path in parquet.items()}
    rows, _ = spark_module.collect(*spark_module.analyze(spark, frames["prediction"], frames["teacher"], frames["label"],
                                                         partitions=2))
    assert {k: s.to_dict() for k, s, _r in rows} == {k: s.to_dict() for k, s in expected.items()}


def test_kdwatch_analyze_engine_spark_prints_the_same_windows_and_notifications(tmp_path: Path) -> None:
    import subprocess
    import sys

    paths = write_jsonl(adversarial(7), tmp_path / "events")
    slo = tmp_path / "slo.yaml"
    slo.write_text("slos:\n  - {name: churn, model: churn-distil, objective: 0.999, period: 1d, "
                   "sli: {events: {metric: agreement}}}\n")
    outputs = []
    for engine in ("local", "spark"):
        out = subprocess.run([sys.executable, "-m", "kdwatch.cli", "analyze", "--predictions", str(paths["prediction"]),
                              "--teacher", str(paths["teacher"]), "--labels", str(paths["label"]), "--slo", str(slo),
                              "--partitions", "2", "--engine", engine, "--master", "local[2]"],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        outputs.append([orjson.loads(line) for line in out.stdout.splitlines()])
    local, spark = outputs
    assert any(row.get("type") == "alert" for row in local)  # the churn student disagrees 30 % of the time: it pages
    assert [row.get("type", "window") for row in spark] == [row.get("type", "window") for row in local]
    assert_same(spark, local, "stdout")
