"""`/metrics` latency of `kdwatch serve` when Kafka is in trouble and while a collector writes.

A local broker, 20,000 events collected into SQLite, then `kdwatch serve` scraped every 50 ms in four
states, in this order: healthy (the baseline), SQLite under a collector consuming a live producer,
the topics deleted (stored offsets now point at nothing), the broker stopped. Each state: 3 rounds of
100 scrapes; p50 and p99 per round, medians reported. Target (issue 19): p99 under 100 ms in every
state.

    python benchmarks/scrape_latency.py [--rounds 3] [--scrapes 100]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from common import ROOT

sys.path.insert(0, str(ROOT))

from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient

from kdwatch.collector.consumer import Topics, ensure_topics
from kdwatch.devkafka import DevKafka, free_port
from kdwatch.generator import TrafficSpec, generate

TARGET_P99_MS = 100.0


def scrape_round(client: httpx.Client, url: str, n: int) -> tuple[float, float]:
    took = []
    for _ in range(n):
        began = time.perf_counter()
        response = client.get(url, timeout=30)
        took.append((time.perf_counter() - began) * 1000)
        if response.status_code != 200:
            raise RuntimeError(f"/metrics answered {response.status_code}")
        time.sleep(0.05)
    took.sort()
    return statistics.median(took), statistics.quantiles(took, n=100, method="inclusive")[98]


def measure(client: httpx.Client, url: str, rounds: int, scrapes: int) -> tuple[float, float]:
    results = [scrape_round(client, url, scrapes) for _ in range(rounds)]
    return statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)


def produce(bootstrap: str, topics: Topics, records: list[tuple[str, str, bytes]], stop: threading.Event | None = None,
            per_second: float | None = None) -> None:
    names = {"prediction": topics.predictions, "teacher": topics.teacher, "label": topics.labels}
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for i, (kind, key, value) in enumerate(records):
        if stop is not None and stop.is_set():
            break
        producer.send(names[kind], key=key.encode(), value=value)
        if per_second is not None and i % 100 == 99:
            producer.flush()
            time.sleep(100 / per_second)
    producer.flush()
    producer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scrapes", type=int, default=100)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kdwatch-scrape-"))
    broker = DevKafka(work / "kafka")
    bootstrap = broker.start().bootstrap
    topics = Topics("scrape.predictions", "scrape.teacher", "scrape.labels")
    ensure_topics(bootstrap, [topics.predictions, topics.teacher, topics.labels], 2)
    records = list(generate(TrafficSpec(events_per_second=20, seed=3), 60_000))
    env = {**os.environ, "KDWATCH_DATABASE_URL": f"sqlite:///{work / 'kdwatch.db'}", "KDWATCH_BOOTSTRAP_SERVERS": bootstrap,
           "KDWATCH_TOPIC_PREDICTIONS": topics.predictions, "KDWATCH_TOPIC_TEACHER": topics.teacher,
           "KDWATCH_TOPIC_LABELS": topics.labels, "KDWATCH_IDLE_TIMEOUT": "1s"}
    produce(bootstrap, topics, records[:20_000])
    subprocess.run([sys.executable, "-m", "kdwatch.cli", "collect", "--idle-exit", "5"], env=env, check=True,
                   capture_output=True)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "kdwatch.cli", "serve", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/metrics"
    rows: list[tuple[str, float, float]] = []
    try:
        with httpx.Client() as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.get(url).status_code == 200:
                        break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.2)
            time.sleep(12)  # a first background lag refresh
            rows.append(("healthy (baseline)", *measure(client, url, args.rounds, args.scrapes)))

            stop = threading.Event()
            writer = subprocess.Popen([sys.executable, "-m", "kdwatch.cli", "collect"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            feeder = threading.Thread(target=produce, args=(bootstrap, topics, records[20_000:], stop, 2_000.0), daemon=True)
            feeder.start()
            time.sleep(5)
            rows.append(("SQLite under a writing collector", *measure(client, url, args.rounds, args.scrapes)))
            stop.set()
            feeder.join(60)
            writer.terminate()
            writer.wait(30)

            admin = KafkaAdminClient(bootstrap_servers=bootstrap)
            admin.delete_topics([topics.predictions, topics.teacher, topics.labels])
            admin.close()
            time.sleep(12)  # a refresh that finds the stored topics gone
            rows.append(("topics deleted", *measure(client, url, args.rounds, args.scrapes)))

            broker.stop()
            time.sleep(12)  # refreshes now fail
            rows.append(("broker stopped", *measure(client, url, args.rounds, args.scrapes)))
    finally:
        server.terminate()
        server.wait(30)
        broker.stop()

    print(f"\n/metrics latency, {args.rounds} rounds of {args.scrapes} scrapes each (medians of the rounds)\n")
    print("| state | p50 ms | p99 ms | target p99 < 100 ms |")
    print("|---|---|---|---|")
    for name, p50, p99 in rows:
        print(f"| {name} | {p50:.1f} | {p99:.1f} | {'met' if p99 < TARGET_P99_MS else 'MISSED'} |")


if __name__ == "__main__":
    main()
