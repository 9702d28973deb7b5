"""Freshness: from producing a window's last event to the window's final result in the REST API.

Live traffic (event time = now, 50 predictions a second, each replayed by the teacher) flows through a
local Kafka broker into the collector; the API (uvicorn, its own database connections, its default
1 s response cache) is polled every 100 ms. A 1-minute window is final once event time passes its end plus the grace, so the
target is grace + 2 s. With ``--silent-from K`` the teacher replays stop when window K starts: window
K - 1 then waits for the teacher input to go idle (``--idle-timeout-s``, the collector's setting), so
its target is grace + idle timeout + 2 s; the later windows are back to grace + 2 s.

    python benchmarks/freshness.py [--windows 3] [--grace-s 5] [--silent-from 1 --idle-timeout-s 30]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import orjson
import uvicorn
from kafka import KafkaProducer

from kdwatch.api import ApiSettings, create_app
from kdwatch.collector.consumer import Collector, CollectorConfig, Topics, ensure_topics
from kdwatch.devkafka import DevKafka
from kdwatch.storage.sql import SqlStore

MIN = 60_000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--grace-s", type=float, default=5.0)
    parser.add_argument("--silent-from", type=int, default=None, help="teacher replays stop when this window starts")
    parser.add_argument("--idle-timeout-s", type=float, default=30.0)
    args = parser.parse_args()
    grace_ms = int(args.grace_s * 1000)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        broker = DevKafka(home / "kafka")
        info = broker.start()
        try:
            run = f"fresh{uuid.uuid4().hex[:8]}"
            topics = Topics(f"{run}.predictions", f"{run}.teacher", f"{run}.labels")
            ensure_topics(info.bootstrap, [topics.predictions, topics.teacher, topics.labels], 4)
            url = f"sqlite:///{home / 'k.db'}"
            store = SqlStore.from_url(url)
            store.migrate()
            collector = Collector(CollectorConfig(info.bootstrap, group_id=run, topics=topics, grace_ms=grace_ms,
                                                  poll_timeout_ms=100, idle_timeout_ms=int(args.idle_timeout_s * 1000)), store)
            silent_at: list[int] = []  # event time from which the teacher is silent
            stop = threading.Event()
            threading.Thread(target=collector.run, kwargs={"stop": stop}, daemon=True).start()
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            server = uvicorn.Server(uvicorn.Config(create_app(SqlStore.from_url(url), ApiSettings()),
                                                   host="127.0.0.1", port=port, log_level="warning"))
            threading.Thread(target=server.run, daemon=True).start()
            while not server.started:
                time.sleep(0.05)

            last_sent: dict[int, float] = {}  # window start -> wall time its last event was acknowledged
            final_at: dict[int, float] = {}

            def produce() -> None:
                producer = KafkaProducer(bootstrap_servers=info.bootstrap, acks="all", linger_ms=0)
                i = 0
                while not stop.is_set():
                    ts = int(time.time() * 1000)
                    rid = f"r{i}"
                    producer.send(topics.predictions, key=rid.encode(), value=orjson.dumps(
                        {"request_id": rid, "model": "m", "student_version": "s1", "ts": ts, "probs": [0.9, 0.1]}))
                    if not silent_at or ts < silent_at[0]:
                        producer.send(topics.teacher, key=rid.encode(), value=orjson.dumps(
                            {"request_id": rid, "model": "m", "teacher_version": "t1", "ts": ts, "probs": [0.8, 0.2]}))
                    producer.flush()
                    last_sent[ts - ts % MIN] = time.time()
                    i += 1
                    time.sleep(0.02)
                producer.close()

            threading.Thread(target=produce, daemon=True).start()
            first_full = (int(time.time() * 1000) // MIN + 1) * MIN  # the first window that gets a full minute
            wanted = [first_full + k * MIN for k in range(args.windows)]
            if args.silent_from is not None:
                silent_at.append(wanted[args.silent_from])
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}")
            deadline = time.time() + (wanted[-1] + MIN - time.time() * 1000) / 1000 + args.grace_s + 30
            while len(final_at) < len(wanted) and time.time() < deadline:
                for w in client.get("/v1/models/m/windows").json().get("windows", []):
                    start = _ms(w["window_start"])
                    if start in wanted and w["final"] and start not in final_at:
                        final_at[start] = time.time()
                time.sleep(0.1)
            stop.set()
            server.should_exit = True
            client.close()
        finally:
            broker.stop()
    delays = [final_at[s] - last_sent[s] for s in wanted if s in final_at]
    silent = f", teacher silent from window {args.silent_from} (idle timeout {args.idle_timeout_s:.0f} s)" \
        if args.silent_from is not None else ""
    print(f"\n{len(delays)} one-minute windows, grace {args.grace_s:.0f} s, 50 events/s live{silent}\n")
    print("| window | seconds from its last event to final in the API | target |")
    print("|---|---|---|")
    for k, (s, d) in enumerate(zip(wanted, delays, strict=False)):
        waits = args.silent_from is not None and k == args.silent_from - 1
        target = args.grace_s + 2 + (args.idle_timeout_s if waits else 0)
        print(f"| {time.strftime('%H:%M', time.gmtime(s / 1000))} | {d:.2f} | <= {target:.0f} s: {'met' if d <= target else 'MISSED'} |")
    if delays:
        print(f"\nmedian {statistics.median(delays):.2f} s")


def _ms(text: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


if __name__ == "__main__":
    main()
