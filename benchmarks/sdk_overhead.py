"""The producer SDK's cost on the serving thread, against the naive way, in the same run on the real broker.

Per call: ``PredictionLogger.log`` (validate against contract v1, enqueue; the background thread
sends) versus ``KafkaProducer.send(topic, orjson.dumps(record))`` called on the serving thread. A
prediction has 10 classes and 10 numeric features. Median and p99 of the per-call time over N calls,
each the median over several runs.

    python benchmarks/sdk_overhead.py [--calls 100000] [--runs 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
from common import median
from kafka import KafkaProducer

from kdwatch.collector.consumer import ensure_topics
from kdwatch.devkafka import DevKafka
from kdwatch.producer import PredictionLogger

PROBS = [0.05, 0.05, 0.1, 0.1, 0.2, 0.2, 0.1, 0.1, 0.05, 0.05]
FEATURES = {f"f{i}": 0.37 * i for i in range(10)}


def sdk_run(bootstrap: str, topic: str, calls: int) -> np.ndarray:
    logger = PredictionLogger(bootstrap, "bench", "s1", predictions_topic=topic, queue_size=calls + 1)
    out = np.empty(calls)
    clock = time.perf_counter_ns
    for i in range(calls):
        start = clock()
        logger.log(f"r{i}", probs=PROBS, features=FEATURES, latency_ms=3.5)
        out[i] = clock() - start
    logger.close(timeout=120)
    assert logger.stats.invalid == 0 and logger.stats.overflow == 0
    return out / 1000.0


def naive_run(bootstrap: str, topic: str, calls: int) -> np.ndarray:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=50, compression_type="lz4")
    out = np.empty(calls)
    clock = time.perf_counter_ns
    for i in range(calls):
        start = clock()
        record = {"request_id": f"r{i}", "model": "bench", "student_version": "s1", "ts": int(time.time() * 1000),
                  "probs": PROBS, "features": FEATURES, "latency_ms": 3.5}
        producer.send(topic, key=record["request_id"].encode(), value=orjson.dumps(record))
        out[i] = clock() - start
    producer.flush(timeout=120)
    producer.close()
    return out / 1000.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        broker = DevKafka(Path(home))
        info = broker.start()
        try:
            ensure_topics(info.bootstrap, ["bench.sdk", "bench.naive"], 4)
            rows = {"PredictionLogger.log (validate + enqueue)": [], "KafkaProducer.send on the serving thread": []}
            for _ in range(args.runs):
                rows["PredictionLogger.log (validate + enqueue)"].append(sdk_run(info.bootstrap, "bench.sdk", args.calls))
                rows["KafkaProducer.send on the serving thread"].append(naive_run(info.bootstrap, "bench.naive", args.calls))
        finally:
            broker.stop()
    print(f"\n{args.calls:,} calls per run, median of {args.runs} runs (µs per call on the serving thread)\n")
    print("| call | median µs | p99 µs |")
    print("|---|---|---|")
    for name, runs in rows.items():
        print(f"| {name} | {median([float(np.median(r)) for r in runs]):.1f} | "
              f"{median([float(np.percentile(r, 99)) for r in runs]):.1f} |")
    sdk = median([float(np.median(r)) for r in rows["PredictionLogger.log (validate + enqueue)"]])
    print(f"\nSDK median {sdk:.1f} µs (target <= 20 µs)")


if __name__ == "__main__":
    main()
