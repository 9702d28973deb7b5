"""``make demo``: traffic through a real local Kafka broker into the collector, windows out."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import orjson
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from analyzer.window import window_result
from collector.consumer import DLT_SUFFIX, Collector, CollectorConfig, Topics, ensure_topics
from kdwatch.devkafka import DevKafka
from kdwatch.generator import TrafficSpec, generate
from kdwatch.loadgen import produce_records
from storage.sql import SqlStore

console = Console()


def _fmt(value: object, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def run_demo(home: Path, n: int) -> None:
    home.mkdir(parents=True, exist_ok=True)
    broker = DevKafka(home / "kafka")
    started_here = broker.info() is None
    with console.status("starting the local Apache Kafka broker (KRaft)..."):
        t0 = time.monotonic()
        info = broker.start()
    console.print(f"broker {info.bootstrap} ready in {time.monotonic() - t0:.1f}s")
    try:
        run = f"demo-{int(time.time())}"
        topics = Topics(f"{run}.predictions", f"{run}.teacher", f"{run}.labels")
        names = [topics.predictions, topics.teacher, topics.labels]
        ensure_topics(info.bootstrap, names + [t + DLT_SUFFIX for t in names], partitions=4)
        db_path = home / f"{run}.db"
        store = SqlStore.from_url(f"sqlite:///{db_path}")
        store.migrate()
        # Event times start 2 hours ago, 50 predictions per second of event time: 60,000 predictions
        # span 20 minutes, so the first 10 windows are final (closed by the 10-minute grace).
        spec = TrafficSpec(start_ms=int(time.time() * 1000) - 2 * 3_600_000)
        kinds = {"prediction": topics.predictions, "teacher": topics.teacher, "label": topics.labels}
        with Progress(console=console) as progress:
            task = progress.add_task(f"producing {n} predictions with their replays and labels", total=None)
            sent = produce_records(info.bootstrap, kinds, generate(spec, n),
                                   progress=lambda c: progress.update(task, completed=c))
            progress.update(task, total=sent, completed=sent)
        console.print(f"produced {sent} records")
        collector = Collector(CollectorConfig(info.bootstrap, group_id=f"{run}-collector", topics=topics), store)
        stop = threading.Event()
        thread = threading.Thread(target=collector.run, kwargs={"stop": stop, "idle_exit_s": 5.0}, daemon=True)
        t1 = time.monotonic()
        thread.start()
        with console.status("collector consuming...") as status:
            while thread.is_alive():
                status.update(f"collector consumed {collector.processed}/{sent} records")
                thread.join(0.5)
        elapsed = time.monotonic() - t1 - 5.0
        console.print(f"collector consumed {collector.processed} records in {elapsed:.1f}s "
                      f"({collector.processed / max(elapsed, 1e-9):,.0f} records/s, 4 partitions, SQLite)")
        table = Table(title="windows from events that went through Kafka (merged across partitions)")
        for column in ("start (UTC)", "final", "n", "n_joined", "n_labeled", "agreement", "kl_mean", "ece", "latency_p95_ms"):
            table.add_column(column)
        rows = sorted(store.windows().items(), key=lambda kv: kv[0].window_start)
        for key, (state, final, window_ms) in rows:
            record = window_result(key.model, key.student_version, key.window_start, window_ms, state)
            table.add_row(record["window_start"][11:19], "yes" if final else "open", str(record["n"]), str(record["n_joined"]),
                          str(record["n_labeled"]), _fmt(record["agreement"]), _fmt(record["kl_mean"]),
                          _fmt(record["ece"]), _fmt(record["latency_p95_ms"], 1))
        console.print(table)
        if rows:
            key, (state, _final, window_ms) = rows[0]
            console.print("first window as `kdwatch analyze` prints it:")
            console.print_json(orjson.dumps(window_result(key.model, key.student_version, key.window_start, window_ms, state)).decode())
        console.print(f"stored in {db_path}; `KDWATCH_DATABASE_URL=sqlite:///{db_path} kdwatch windows` prints them all")
    finally:
        if started_here and not os.environ.get("KDWATCH_KEEP_BROKER"):
            broker.stop()
            console.print("broker stopped")
