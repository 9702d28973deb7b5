"""``make demo``: traffic through a real local Kafka broker into the collector, with the live SLO engine.

Three hours of event time (starting four hours ago): 90 clean minutes, then 90 minutes in which the
student disagrees with its teacher far more often. The collector stores windows through Kafka; the
live SLO engine beside it evaluates them as they become final and pages on the agreement SLO.
"""

from __future__ import annotations

import os
import threading
import time
from itertools import chain
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from analyzer.window import WindowState, window_result
from collector.consumer import DLT_SUFFIX, Collector, CollectorConfig, Topics, ensure_topics
from kdwatch.devkafka import DevKafka
from kdwatch.generator import TrafficSpec, generate
from kdwatch.loadgen import produce_records
from slo.config import parse_slo_file
from slo.dispatch import Dispatcher
from slo.live import LiveConfig, LiveEngine
from storage.slo_store import SloSqlStore
from storage.sql import SqlStore

console = Console()
MIN = 60_000
PHASE_MIN = 90
RATE = 5.0  # predictions per second of event time

DEMO_SLOS = {
    "slos": [{"name": "agreement", "model": "fraud-distil", "objective": 0.98,
              "sli": {"events": {"metric": "agreement"}}, "alerting": {"min_events": 100}}],
    "retrain": [{"model": "fraud-distil", "when": [{"slo": "agreement", "severity": "page"}]}],
}


def _fmt(value: object, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _phase_summary(rows: list[tuple[Any, tuple[WindowState, bool, int]]], start_ms: int) -> Table:
    table = Table(title="per phase (merged window state through Kafka)")
    for column in ("phase", "windows", "n", "n_joined", "agreement", "kl_mean", "ece"):
        table.add_column(column)
    for name, lo, hi in (("clean", 0, PHASE_MIN), ("incident", PHASE_MIN, 2 * PHASE_MIN)):
        merged, count = WindowState(), 0
        for key, (state, _final, _window_ms) in rows:
            minute = (key.window_start - start_ms) // MIN
            if lo <= minute < hi:
                merged.merge(WindowState.from_dict(state.to_dict()))
                count += 1
        r = merged.result()
        table.add_row(name, str(count), str(r["n"]), str(r["n_joined"]), _fmt(r["agreement"]), _fmt(r["kl_mean"]), _fmt(r["ece"]))
    return table


def run_demo(home: Path, n: int) -> None:
    home.mkdir(parents=True, exist_ok=True)
    broker = DevKafka(home / "kafka")
    started_here = broker.info() is None
    with console.status("starting the local Apache Kafka broker (KRaft)..."):
        t0 = time.monotonic()
        info = broker.start()
    console.print(f"broker {info.bootstrap} ready in {time.monotonic() - t0:.1f}s")
    try:
        _run(home, info.bootstrap, n)
    finally:
        if started_here and not os.environ.get("KDWATCH_KEEP_BROKER"):
            broker.stop()
            console.print("broker stopped")


def _run(home: Path, bootstrap: str, n: int) -> None:
    run = f"demo-{int(time.time())}"
    topics = Topics(f"{run}.predictions", f"{run}.teacher", f"{run}.labels")
    names = [topics.predictions, topics.teacher, topics.labels]
    ensure_topics(bootstrap, names + [t + DLT_SUFFIX for t in names], partitions=4)
    db_path = home / f"{run}.db"
    store = SqlStore.from_url(f"sqlite:///{db_path}")
    store.migrate()

    now_ms = int(time.time() * 1000)
    start_ms = now_ms - 4 * 3_600_000
    start_ms -= start_ms % MIN
    per_phase = max(n // 2, 1)
    rate = per_phase / (PHASE_MIN * 60)
    clean = TrafficSpec(start_ms=start_ms, events_per_second=rate, teacher_rate=0.2, seed=1)
    incident = TrafficSpec(start_ms=start_ms + PHASE_MIN * MIN, events_per_second=rate, teacher_rate=0.2,
                           disagreement=0.4, seed=2)
    kinds = {"prediction": topics.predictions, "teacher": topics.teacher, "label": topics.labels}
    with Progress(console=console) as progress:
        task = progress.add_task(f"producing {2 * per_phase} predictions with replays and labels", total=None)
        sent = produce_records(bootstrap, kinds, chain(generate(clean, per_phase), generate(incident, per_phase)),
                               progress=lambda c: progress.update(task, completed=c))
        progress.update(task, total=sent, completed=sent)
    console.print(f"produced {sent} records: {PHASE_MIN} min clean, then {PHASE_MIN} min with 40 % forced disagreement")

    collector = Collector(CollectorConfig(bootstrap, group_id=f"{run}-collector", topics=topics), store)
    slo_store = SloSqlStore(store.engine)
    client = httpx.Client()
    engine = LiveEngine(parse_slo_file(DEMO_SLOS), store, slo_store, Dispatcher(slo_store, {}, client), LiveConfig(),
                        client=client)
    stop = threading.Event()
    collector_thread = threading.Thread(target=collector.run, kwargs={"stop": stop, "idle_exit_s": 5.0}, daemon=True)

    def engine_loop() -> None:
        while not stop.is_set():
            for note in engine.run_once():
                minute = (_parse_ms(note["at"]) - start_ms) / MIN
                if note["type"] == "alert":
                    console.print(f"  [bold red]{note['severity'].upper()}[/] {note['status']:8} slo={note['slo']} "
                                  f"tier={note['tier']} at event minute {minute:.0f} "
                                  f"(burn {_fmt(note['burn_long'], 1)} / {_fmt(note['burn_short'], 1)})")
                else:
                    console.print(f"  [bold yellow]RETRAIN[/] {note['model']} at event minute {minute:.0f}: {note['reason']}")
            stop.wait(1.0)

    engine_thread = threading.Thread(target=engine_loop, daemon=True)
    t1 = time.monotonic()
    collector_thread.start()
    engine_thread.start()
    console.print("collector and live SLO engine running; notifications as the engine sends them:")
    while collector_thread.is_alive():
        collector_thread.join(0.5)
    elapsed = time.monotonic() - t1 - 5.0
    engine.run_once()
    stop.set()
    engine_thread.join(5)
    engine.close()
    console.print(f"collector consumed {collector.processed} records in {elapsed:.1f}s "
                  f"({collector.processed / max(elapsed, 1e-9):,.0f} records/s, 4 partitions, SQLite)")

    rows = sorted(store.windows().items(), key=lambda kv: kv[0].window_start)
    console.print(_phase_summary(rows, start_ms))
    table = Table(title="every 15th window (as `kdwatch windows` prints them)")
    for column in ("start (UTC)", "final", "n", "n_joined", "agreement", "kl_mean", "ece", "latency_p95_ms"):
        table.add_column(column)
    for key, (state, final, window_ms) in rows[::15]:
        record = window_result(key.model, key.student_version, key.window_start, window_ms, state)
        table.add_row(record["window_start"][11:16], "yes" if final else "open", str(record["n"]), str(record["n_joined"]),
                      _fmt(record["agreement"]), _fmt(record["kl_mean"]), _fmt(record["ece"]), _fmt(record["latency_p95_ms"], 1))
    console.print(table)
    pages = [x for x in engine.notifications if x["type"] == "alert" and x["severity"] == "page" and x["status"] == "firing"]
    console.print(f"pages sent: {len(pages)}; retrain requests: {sum(1 for x in engine.notifications if x['type'] == 'retrain')}")
    console.print(f"stored in {db_path}; `KDWATCH_DATABASE_URL=sqlite:///{db_path} kdwatch windows` prints every window")
    store.close()


def _parse_ms(text: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)
