"""Shared steps of the integration tests: topics, traffic, a collector run, the offline truth."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from kdwatch.analyzer.drift import Reference
from kdwatch.analyzer.window import WindowState, window_result
from kdwatch.collector.consumer import Collector, CollectorConfig, Topics, ensure_topics
from kdwatch.collector.offline import analyze_files
from kdwatch.collector.records import WindowKey
from kdwatch.storage.sql import SqlStore

# Tests that produce everything before or while a collector runs, with no pause between the topics, let
# an input at its end idle after half a second (the default, 30 s, would only slow the tail down).
TEST_IDLE_MS = 500

KIND_FILES = {"prediction": "predictions.jsonl", "teacher": "teacher.jsonl", "label": "labels.jsonl"}


def new_topics(bootstrap: str, partitions: int = 3) -> Topics:
    run = f"t{uuid.uuid4().hex[:10]}"
    topics = Topics(f"{run}.predictions", f"{run}.teacher", f"{run}.labels")
    ensure_topics(bootstrap, [topics.predictions, topics.teacher, topics.labels], partitions)
    return topics


def read_topic(kafka: str, topic: str) -> list[tuple[bytes | None, bytes, dict[str, bytes]]]:
    """Every record of ``topic`` from the beginning: (key, value, headers)."""
    consumer = KafkaConsumer(bootstrap_servers=kafka, enable_auto_commit=False, consumer_timeout_ms=3000,
                             fetch_max_bytes=32 * 1024 * 1024, max_partition_fetch_bytes=16 * 1024 * 1024)
    parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    out = [(r.key, r.value, dict(r.headers)) for r in consumer]
    consumer.close()
    return out


def topic_map(topics: Topics) -> dict[str, str]:
    return {"prediction": topics.predictions, "teacher": topics.teacher, "label": topics.labels}


def write_jsonl(records: list[tuple[str, str, bytes]], directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {kind: directory / name for kind, name in KIND_FILES.items()}
    handles = {kind: path.open("wb") for kind, path in paths.items()}
    for kind, _rid, value in records:
        handles[kind].write(value + b"\n")
    for handle in handles.values():
        handle.close()
    return paths


def offline_results(paths: dict[str, Path], references: dict[str, Reference] | None = None,
                    window_ms: int = 60_000, grace_ms: int = 600_000) -> dict[tuple[str, str, int], dict[str, Any]]:
    windows, _counters = analyze_files(paths["prediction"], paths["teacher"], paths["label"],
                                       window_ms=window_ms, grace_ms=grace_ms, references=references)
    return window_results(windows, window_ms, references)


def window_results(windows: dict[WindowKey, WindowState], window_ms: int,
                   references: dict[str, Reference] | None = None) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Each window's public record, keyed (model, student_version, window_start)."""
    return {(k.model, k.student_version, k.window_start): window_result(k.model, k.student_version, k.window_start, window_ms,
                                                                         s, (references or {}).get(k.model))
            for k, s in windows.items()}


def stored_results(store: SqlStore, references: dict[str, Reference] | None = None) -> dict[tuple[str, str, int], dict[str, Any]]:
    return {(k.model, k.student_version, k.window_start): window_result(k.model, k.student_version, k.window_start, wms, s,
                                                                         (references or {}).get(k.model))
            for k, (s, _final, wms) in store.windows().items()}


def run_collector_until(config: CollectorConfig, store: SqlStore, expected_records: int, timeout_s: float = 180.0,
                        references: dict[str, Reference] | None = None) -> Collector:
    """Run a collector in a thread until it has processed ``expected_records``, then stop it."""
    collector = Collector(config, store, references)
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            collector.run(stop)
        except BaseException as exc:  # surfaced to the test below
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while collector.processed < expected_records and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.2)
    stop.set()
    thread.join(30)
    if errors:
        raise errors[0]
    assert collector.processed == expected_records, f"processed {collector.processed} of {expected_records}"
    return collector


def differences(actual: dict[Any, dict[str, Any]], expected: dict[Any, dict[str, Any]]) -> list[tuple[Any, str, Any, Any]]:
    """(window, field, actual, expected) for every field that differs; missing windows too."""
    out: list[tuple[Any, str, Any, Any]] = []
    for key in sorted(set(actual) | set(expected)):
        a, e = actual.get(key), expected.get(key)
        if a is None or e is None:
            out.append((key, "<window>", a is not None, e is not None))
            continue
        out.extend((key, f, a.get(f), e.get(f)) for f in sorted(set(a) | set(e)) if a.get(f) != e.get(f))
    return out


def explain(diffs: list[tuple[Any, str, Any, Any]]) -> str:
    """A short account of ``differences``: how many per field, and the first few."""
    per_field: dict[str, int] = {}
    for _key, name, _a, _e in diffs:
        per_field[name] = per_field.get(name, 0) + 1
    head = "\n".join(f"  {k[2] if isinstance(k, tuple) else k} {name}: {a!r:.80} != {e!r:.80}" for k, name, a, e in diffs[:12])
    return f"{len(diffs)} differences, per field {per_field}\n{head}"


def collector_process(kafka: str, database_url: str, topics: Topics, group: str, log: Path,
                      idle_exit: float | None = None, max_poll_records: int = 500, idle_timeout_ms: int = TEST_IDLE_MS,
                      extra_env: dict[str, str] | None = None) -> Any:
    """`kdwatch collect` as its own process (so it can be killed), logging to ``log``."""
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "KDWATCH_DATABASE_URL": database_url,
        "KDWATCH_BOOTSTRAP_SERVERS": kafka,
        "KDWATCH_GROUP_ID": group,
        "KDWATCH_TOPIC_PREDICTIONS": topics.predictions,
        "KDWATCH_TOPIC_TEACHER": topics.teacher,
        "KDWATCH_TOPIC_LABELS": topics.labels,
        "KDWATCH_SESSION_TIMEOUT": "3s",
        "KDWATCH_MAX_POLL_RECORDS": str(max_poll_records),
        "KDWATCH_IDLE_TIMEOUT": f"{idle_timeout_ms}ms",
        **(extra_env or {}),
    }
    args = [sys.executable, "-m", "kdwatch.cli", "collect"]
    if idle_exit is not None:
        args += ["--idle-exit", str(idle_exit)]
    with log.open("ab") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)


def stored_n(store: SqlStore) -> int:
    return sum(state.n for state, _final, _w in store.windows().values())
