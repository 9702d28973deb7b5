"""kill -9 the collector at random moments spread over the stream: the stored windows still equal one uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

from kdwatch.generator import TrafficSpec, generate
from kdwatch.loadgen import produce_records
from kdwatch.storage.sql import SqlStore
from tests.integration.helpers import (
    collector_process,
    differences,
    explain,
    new_topics,
    offline_results,
    stored_results,
    topic_map,
    write_jsonl,
)

KILLS = 5


def test_kill_9_at_random_moments_loses_and_duplicates_nothing(kafka: str, database_url: str, store: SqlStore, tmp_path: Path) -> None:
    rng = random.Random(20261128)
    total = int(os.environ.get("KDWATCH_CRASH_PREDICTIONS", "50000"))  # `make soak`: 200,000
    records = list(generate(TrafficSpec(seed=11, events_per_second=40), total))
    paths = write_jsonl(records, tmp_path / "events")
    topics = new_topics(kafka, partitions=2)
    produce_records(kafka, topic_map(topics), records)
    group = "crash-" + topics.predictions
    log = tmp_path / "collector.log"

    def stored_n() -> int:
        """Predictions processed and committed (the offsets stored with the state; open windows are stored now and then)."""
        return sum(o for (g, topic, _p), o in store.offsets().items() if g == group and topic == topics.predictions)

    # Kill k lands once the stored count passes k/(KILLS+1) of the stream, plus a random delay: the
    # kills spread over the whole stream, at random points inside batches and transactions. Small polls
    # (many commits) keep the fast engine inside the stream long enough for that.
    progress = []
    for k in range(1, KILLS + 1):
        before = stored_n()
        proc = collector_process(kafka, database_url, topics, group, log, max_poll_records=40)
        target = max(total * k // (KILLS + 1), before + 1)
        deadline = time.monotonic() + 180
        while stored_n() < target and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        progress.append(stored_n())
    final = collector_process(kafka, database_url, topics, group, log, idle_exit=8.0)
    assert final.wait(timeout=300) == 0, log.read_text()[-3000:]

    stored = stored_results(store)
    expected = offline_results(paths)
    # The stored count moves in steps (a co-partition waits for its inputs, then catches up, and the last step
    # can finish the stream inside the random delay): the first kill lands in the first half of the stream and
    # at least one lands in the second half before the end.
    assert progress == sorted(progress) and 0 < progress[0] < total // 2, f"first kill too late: {progress}"
    assert any(total // 2 < p < total for p in progress), f"no kill in the stream's second half: {progress}"
    assert sum(r["n"] for r in stored.values()) == total
    diffs = differences(stored, expected)
    assert not diffs, explain(diffs)
