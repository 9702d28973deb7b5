"""A broker restart mid-stream and a consumer group scaled 1 -> 3 -> 1: nothing lost, nothing counted twice."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from kdwatch.devkafka import DevKafka
from kdwatch.generator import TrafficSpec, generate
from kdwatch.loadgen import produce_records
from kdwatch.storage.sql import SqlStore
from tests.integration.helpers import (
    collector_process,
    differences,
    explain,
    new_topics,
    offline_results,
    stored_n,
    stored_results,
    topic_map,
    write_jsonl,
)


def wait_for_progress(store: SqlStore, above: int, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        n = stored_n(store)
        if n > above:
            return n
        time.sleep(0.1)
    raise AssertionError(f"no progress past {above} in {timeout_s}s")


def test_a_broker_restart_mid_stream_loses_and_duplicates_nothing(kafka_broker: DevKafka, kafka: str, store: SqlStore,
                                                                   tmp_path: Path) -> None:
    total = 40_000
    records = list(generate(TrafficSpec(seed=21, events_per_second=40), total))
    topics = new_topics(kafka, partitions=2)
    produce_records(kafka, topic_map(topics), records)
    log = tmp_path / "collector.log"
    url = str(store.engine.url.render_as_string(hide_password=False))
    proc = collector_process(kafka, url, topics, "restart-" + topics.predictions, log, idle_exit=15.0, max_poll_records=300)
    wait_for_progress(store, 0)
    at_restart = stored_n(store)  # taken as the broker goes down: the restart lands mid-stream
    kafka_broker.restart(down_s=2.0)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert 0 < at_restart < total
    assert stored_n(store) == total
    diffs = differences(stored_results(store), offline_results(write_jsonl(records, tmp_path / "events")))
    assert not diffs, explain(diffs)


def test_scaling_the_group_1_3_1_loses_and_duplicates_nothing(kafka: str, store: SqlStore, tmp_path: Path) -> None:
    total = 40_000
    records = list(generate(TrafficSpec(seed=22, events_per_second=40), total))
    topics = new_topics(kafka, partitions=4)
    # The first half before the group starts; the second once three members share it, so they all consume.
    half = len(records) // 2
    produce_records(kafka, topic_map(topics), records[:half])
    url = str(store.engine.url.render_as_string(hide_password=False))
    group = "scale-" + topics.predictions
    first = collector_process(kafka, url, topics, group, tmp_path / "a.log", idle_exit=15.0, max_poll_records=200)
    progress = wait_for_progress(store, 0)
    helpers = [collector_process(kafka, url, topics, group, tmp_path / f"{name}.log", max_poll_records=200) for name in "bc"]
    # Wait until both helpers own partitions (the group rebalanced to three members), then let them work.
    deadline = time.monotonic() + 120
    while not all("loaded" in (tmp_path / f"{name}.log").read_text() for name in "bc"):
        assert time.monotonic() < deadline, "the helpers never got partitions"
        time.sleep(0.2)
    produce_records(kafka, topic_map(topics), records[half:])
    progress = wait_for_progress(store, stored_n(store) + 2_000)  # the three of them share the partitions
    for helper in helpers:
        helper.send_signal(signal.SIGTERM)  # leave the group: back to one member
        helper.wait(timeout=60)
    assert first.wait(timeout=300) == 0, (tmp_path / "a.log").read_text()[-3000:]
    assert progress < total
    # Each helper owned partitions while it ran, and the first member gave some up and took them back.
    for name in "bc":
        assert "loaded" in (tmp_path / f"{name}.log").read_text(), name
    first_log = (tmp_path / "a.log").read_text()
    assert "revoked" in first_log and first_log.count("loaded") > 4, first_log[-3000:]
    assert stored_n(store) == total
    diffs = differences(stored_results(store), offline_results(write_jsonl(records, tmp_path / "events")))
    assert not diffs, explain(diffs)
