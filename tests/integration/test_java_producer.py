"""The JSON Schemas are the contract: a Java service using Apache's kafka-clients feeds kdwatch directly."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from kdwatch.collector.consumer import CollectorConfig
from kdwatch.devkafka import ensure_jars
from kdwatch.storage.sql import SqlStore
from tests.integration.helpers import TEST_IDLE_MS, new_topics, run_collector_until

SOURCE = Path(__file__).parent / "java" / "PredictionProducer.java"
TS0 = 1_795_000_020_000


def test_a_java_producer_s_predictions_are_consumed_and_counted(kafka: str, tmp_path: Path) -> None:
    javac, java = shutil.which("javac"), shutil.which("java")
    assert javac and java, "installed by `make setup` (a JDK)"
    jars = ensure_jars()  # kafka-clients and its dependencies, fetched from Maven Central by the setup
    clients = next(jars.glob("kafka-clients-*.jar"))
    classes = tmp_path / "classes"
    subprocess.run([javac, "-cp", str(clients), "-d", str(classes), str(SOURCE)], check=True, capture_output=True, timeout=120)
    topics = new_topics(kafka, partitions=2)
    n = 1_200  # 100 ms apart: two one-minute windows
    run = subprocess.run([java, "-cp", f"{classes}:{jars}/*", "PredictionProducer", kafka, topics.predictions, str(n), str(TS0)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]

    store = SqlStore.from_url(f"sqlite:///{tmp_path / 'kdwatch.db'}")
    store.migrate()
    run_collector_until(CollectorConfig(kafka, idle_timeout_ms=TEST_IDLE_MS,
                                        group_id="java-" + topics.predictions, topics=topics), store, n)
    windows = store.windows(model="java-svc")
    assert sum(state.n for state, _final, _w in windows.values()) == n
    assert {k.student_version for k in windows} == {"j1"}
    assert {k: v for k, v in store.counters().items() if k[0] == "prediction"} == {("prediction", "valid"): n}
    merged = next(iter(windows.values()))[0]
    for state, _final, _w in list(windows.values())[1:]:
        merged.merge(state)
    result = merged.result()
    store.close()
    assert (result["n"], result["n_rejected"]) == (n, 0)
    assert 1.5 <= result["latency_p50_ms"] <= 7.5  # the latencies the Java side sent (1.5 + i % 7)
