"""``make demo``: the closed loop on real data, through a real local Kafka broker.

1. Train a teacher (PyTorch MLP) on scikit-learn's digits and distil a small student from it.
2. Start the local Apache Kafka broker, the collector, the teacher replayer (running a TorchScript
   export of the teacher on a deterministic half of the predictions), the live SLO engine, the REST
   API and the training runner (all on this machine, stopped at the end).
3. Replay digits with event times spanning three hours (starting four hours ago), paced so the
   pipeline keeps up: a clean hour, then a distribution shift (Gaussian pixel noise) that drops
   teacher-student agreement. The agreement SLO pages; the page triggers a signed retrain webhook;
   the runner distils a new student on the transfer set the collector kept, gates and registers it;
   the traffic switches to the new student's TorchScript export and agreement recovers.
4. Audit replays of training members and outsiders show the student's membership-inference risk.
5. Print a per-phase summary and write the HTML report.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from fastapi import FastAPI
from kafka import KafkaProducer
from rich.console import Console
from rich.table import Table

from kdwatch import digits
from kdwatch.analyzer.window import WindowState
from kdwatch.collector.consumer import DLT_SUFFIX, Collector, CollectorConfig, Topics, ensure_topics
from kdwatch.collector.offline import build_references
from kdwatch.collector.replayer import Replayer, ReplayerConfig
from kdwatch.collector.teachers import TorchScriptTeacher
from kdwatch.devkafka import DevKafka
from kdwatch.runner.distill import TrainConfig
from kdwatch.runner.registry import Registry
from kdwatch.secrets import new_webhook_secret as new_secret
from kdwatch.slo.dispatch import Receiver
from kdwatch.slo.live import LiveConfig, LiveEngine
from kdwatch.storage.jobs import PROMOTED, JobStore
from kdwatch.storage.sql import SqlStore
from kdwatch.wiring import build_api, build_collector, build_live_engine, build_runner, open_store, runner_app, store_slos

MIN = 60_000
MODEL = "digits-student"


@dataclass(frozen=True)
class DemoOptions:
    clean_minutes: int = 60
    total_minutes: int = 180
    per_minute: int = 100  # predictions per minute of event time
    chunk_minutes: int = 5  # traffic is sent in chunks of event time, each consumed before the next
    noise: float = 0.2  # the shift: Gaussian pixel noise (pixels in [0, 1])
    objective: float = 0.97
    audits: int = 150  # audit replays of members, and as many of outsiders, during the clean hour
    teacher_rate: float = 0.5  # share of predictions the replayer runs through the teacher
    student: TrainConfig = field(default_factory=lambda: TrainConfig(hidden=(32,), epochs=40, alpha=0.5, min_records=200))
    job_timeout_s: float = 120.0


@dataclass
class DemoOutcome:
    phases: list[dict[str, Any]] = field(default_factory=list)
    notifications: list[dict[str, Any]] = field(default_factory=list)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    report: Path | None = None
    seconds: float = 0.0

    def pages(self) -> list[dict[str, Any]]:
        return [n for n in self.notifications if n["type"] == "alert" and n["severity"] == "page" and n["status"] == "firing"]

    def phase(self, name: str) -> dict[str, Any]:
        return next(p for p in self.phases if p["phase"] == name)


class LocalServer:
    """A uvicorn server in a thread, on a free loopback port."""

    def __init__(self, app: FastAPI) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LocalServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("an HTTP server of the demo did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def run_demo(home: Path, options: DemoOptions | None = None, console: Console | None = None) -> DemoOutcome:
    """Start (or reuse) the local broker, run the closed loop, stop what was started here."""
    console = console or Console()
    home.mkdir(parents=True, exist_ok=True)
    broker = DevKafka(home / "kafka")
    started_here = broker.info() is None
    with console.status("starting the local Apache Kafka broker (KRaft)..."):
        t0 = time.monotonic()
        info = broker.start()
    console.print(f"broker {info.bootstrap} ready in {time.monotonic() - t0:.1f}s")
    try:
        return closed_loop(home, info.bootstrap, options or DemoOptions(), console)
    finally:
        if started_here and not os.environ.get("KDWATCH_KEEP_BROKER"):
            broker.stop()
            console.print("broker stopped")


@dataclass
class _Models:
    """Phase 1's output: the data, the teacher, the first student and where they are registered."""

    data: Any
    teacher: Any  # features -> probabilities
    student: Any
    registry: Registry
    teacher_file: Path  # the teacher's TorchScript export, as the replayer runs it


@dataclass
class _Stack:
    """Phase 2's output: every part of kdwatch the demo runs, built by kdwatch.wiring as the CLI builds them."""

    topics: Topics
    store: SqlStore
    references: dict[str, Any]
    collector: Collector
    replayer: Replayer
    engine: LiveEngine
    jobs: JobStore
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)


def closed_loop(home: Path, bootstrap: str, options: DemoOptions, console: Console) -> DemoOutcome:
    """The whole story: train, start the parts, replay clean then shifted traffic, report."""
    began = time.monotonic()
    run = f"demo-{int(time.time())}"
    workdir = home / run
    workdir.mkdir(parents=True)
    models = _train_models(workdir, options, console, began)
    outcome = DemoOutcome()
    db_url = f"sqlite:///{workdir / 'kdwatch.db'}"
    store = open_store(db_url)
    secret = new_secret()
    with LocalServer(build_api(open_store(db_url))) as api, \
            LocalServer(runner_app(build_runner(open_store(db_url), secret, workdir / "registry", options.student,
                                            poll_interval_s=0.2))) as runner_server:
        stack = _build_stack(run, bootstrap, store, models, options, retrain_url=runner_server.url + "/webhooks/retrain",
                             secret=secret)
        start_ms = int(time.time() * 1000) - 4 * 3_600_000
        start_ms -= start_ms % MIN
        _start(stack, console, start_ms)
        console.print(f"collector, teacher replayer (TorchScript, {options.teacher_rate:.0%} sampled), SLO engine, "
                      f"API ({api.url}) and runner ({runner_server.url}) running; "
                      f"replaying {options.total_minutes} minutes of traffic, {options.per_minute} predictions a minute")
        try:
            phase_starts = _replay_traffic(stack, models, bootstrap, options, console, start_ms)
            time.sleep(1.0)  # a last engine cycle over the final windows
        finally:
            _stop(stack)
        outcome.notifications = stack.engine.notifications
        outcome.jobs = stack.jobs.list(MODEL)
        outcome.report = _write_report(api.url, start_ms, options, workdir / "report.html")
    outcome.phases = _phases(store, phase_starts, start_ms, options, stack.references[MODEL], outcome.notifications, outcome.jobs)
    outcome.seconds = time.monotonic() - began
    _print_summary(console, outcome, stack.collector.processed, workdir)
    store.close()
    return outcome


def _train_models(workdir: Path, options: DemoOptions, console: Console, began: float) -> _Models:
    """Phase 1: a teacher on scikit-learn's digits, a first student distilled from it, both registered."""
    with console.status("training a teacher on scikit-learn's digits and distilling a student from it..."):
        data = digits.load()
        teacher_module = digits.train_teacher(data)
        teacher = digits.predictor(teacher_module)
        first = digits.distil_first_student(data, teacher, options.student)
        student = digits.predictor(first)
        registry = Registry(workdir / "registry")
        registry.register(MODEL, "s1", first, {"parent_version": None, "note": "distilled on the training images"})
        registry.promote(MODEL, "s1")
        # The teacher as the replayer runs it: a TorchScript export with its feature order beside it.
        teacher_file = Registry(workdir / "teachers").register(
            "digits-teacher", "t1", teacher_module, {"features": digits.FEATURES}) / "model.torchscript"
    outsiders = data.outsiders
    t_out, s_out = teacher(data.x[outsiders]).argmax(1), student(data.x[outsiders]).argmax(1)
    console.print(f"teacher accuracy on held-out digits {np.mean(t_out == data.y[outsiders]):.3f}; student s1 agrees with it "
                  f"on {np.mean(t_out == s_out):.3f} ({time.monotonic() - began:.1f}s)")
    return _Models(data, teacher, student, registry, teacher_file)


def _build_stack(run: str, bootstrap: str, store: SqlStore, models: _Models, options: DemoOptions, retrain_url: str,
                 secret: str) -> _Stack:
    """Phase 2: topics, the PSI reference, the SLOs, the collector, the replayer and the live SLO engine."""
    topics = Topics(f"{run}.predictions", f"{run}.teacher", f"{run}.labels")
    names = [topics.predictions, topics.teacher, topics.labels]
    ensure_topics(bootstrap, names + [t + DLT_SUFFIX for t in names], partitions=4)
    baseline = digits.baseline(models.data, MODEL, "s1", models.student)
    references = {m: ref for m, (ref, _n) in build_references(baseline).items()}
    store.put_reference(MODEL, references[MODEL])
    store_slos(store, {
        "slos": [{"name": "agreement", "model": MODEL, "objective": options.objective,
                  "sli": {"events": {"metric": "agreement"}}, "alerting": {"min_events": 1000}}],
        "retrain": [{"model": MODEL, "when": [{"slo": "agreement", "severity": "page"}]}],
    })
    # Idle timeout 1 s: each chunk ends with every topic quiet, and the demo waits for the collector to finish
    # it before sending the next; the replayer keeps up well within that (the default, 30 s, is for production).
    collector = build_collector(CollectorConfig(bootstrap, group_id=f"{run}-collector", topics=topics, grace_ms=3 * MIN,
                                                transfer_per_window=50, idle_timeout_ms=1_000), store, references)
    replayer = Replayer(ReplayerConfig(bootstrap, topics.predictions, topics.teacher, group_id=f"{run}-replayer",
                                       teacher_version="t1", sample_rate=options.teacher_rate),
                        TorchScriptTeacher(models.teacher_file))
    engine = build_live_engine(store, LiveConfig(retrain_webhook=Receiver("retrain", retrain_url, secret)))
    return _Stack(topics, store, references, collector, replayer, engine, JobStore(store.engine))


def _start(stack: _Stack, console: Console, start_ms: int) -> None:
    def engine_loop() -> None:
        while not stack.stop.is_set():
            for note in stack.engine.run_once():
                _print_note(console, note, start_ms)
            stack.stop.wait(0.3)

    stack.threads = [threading.Thread(target=stack.collector.run, kwargs={"stop": stack.stop}, daemon=True),
                     threading.Thread(target=stack.replayer.run, kwargs={"stop": stack.stop}, daemon=True),
                     threading.Thread(target=engine_loop, daemon=True)]
    for thread in stack.threads:
        thread.start()


def _stop(stack: _Stack) -> None:
    stack.stop.set()
    for thread in stack.threads:
        thread.join(30)
    stack.engine.close()


def _replay_traffic(stack: _Stack, models: _Models, bootstrap: str, options: DemoOptions, console: Console,
                    start_ms: int) -> list[tuple[str, str, int]]:
    """Phase 3: clean traffic, then the shift; switches to a retrained student once the runner promotes one.

    Returns the phases as (name, student version, first event minute).
    """
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=256 * 1024,
                             compression_type="lz4")
    topics = stack.topics
    kinds = {"prediction": topics.predictions, "teacher": topics.teacher, "label": topics.labels}
    sent = predictions = 0
    student, version, phase_starts = models.student, "s1", [("clean", "s1", 0)]
    try:
        for minute in range(0, options.total_minutes, options.chunk_minutes):
            if minute == options.clean_minutes:
                phase_starts.append(("shift", version, minute))
                console.print(f"[bold]event minute {minute}: the input distribution shifts (pixel noise {options.noise})[/]")
            done = [j for j in stack.jobs.list(MODEL) if j["status"] == PROMOTED and j["student_version"] != version]
            if done:
                version = done[0]["student_version"]
                student = digits.predictor(models.registry.load_torchscript(MODEL, version))
                phase_starts.append(("retrained", version, minute))
                console.print(f"[bold green]event minute {minute}: traffic switches to student {version}[/] "
                              f"(TorchScript from the registry)")
            phase = digits.Phase(MODEL, version, start_ms + minute * MIN, options.chunk_minutes * options.per_minute,
                                 interval_ms=MIN // options.per_minute,
                                 noise=options.noise if minute >= options.clean_minutes else 0.0,
                                 audits=options.audits if minute == 0 else 0, seed=minute + 1)
            for kind, request_id, value in digits.traffic(models.data, phase, student, teacher=None):  # replays: the replayer's
                producer.send(kinds[kind], key=request_id.encode(), value=value)
                sent += 1
                predictions += kind == "prediction"
            producer.flush(timeout=60)
            _wait_for_chunk(stack, sent, predictions, options)
    finally:
        producer.close(timeout=10)
    return phase_starts


def _wait_for_chunk(stack: _Stack, sent: int, predictions: int, options: DemoOptions) -> None:
    """Each chunk is consumed before the next is sent; a retrain under way gets the time a real runner would have."""
    _wait(lambda: stack.replayer.processed >= predictions, 60, "the replayer to read the chunk")
    _wait(lambda: stack.collector.processed >= sent + stack.replayer.published, 60, "the collector to consume the chunk")
    if any(j["status"] in ("queued", "running") for j in stack.jobs.list(MODEL)):
        _wait(lambda: not any(j["status"] in ("queued", "running") for j in stack.jobs.list(MODEL)),
              options.job_timeout_s, "the retrain job")


def _write_report(api_url: str, start_ms: int, options: DemoOptions, report: Path) -> Path:
    response = httpx.get(f"{api_url}/v1/models/{MODEL}/report",
                         params={"from": str(start_ms), "to": str(start_ms + options.total_minutes * MIN)}, timeout=120)
    response.raise_for_status()
    report.write_text(response.text)
    return report


def _wait(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.05)


def _print_note(console: Console, note: dict[str, Any], start_ms: int) -> None:
    minute = (_parse_ms(note["at"]) - start_ms) / MIN
    if note["type"] == "alert":
        colour = "red" if note["severity"] == "page" else "yellow"
        console.print(f"  [bold {colour}]{note['severity'].upper()}[/] {note['status']:8} slo={note['slo']} tier={note['tier']} "
                      f"at event minute {minute:.0f} (burn {note['burn_long']:.1f} / {note['burn_short']:.1f})")
    elif note["type"] == "retrain":
        console.print(f"  [bold magenta]RETRAIN[/] webhook to the runner at event minute {minute:.0f}: {note['reason']}")


def _phases(store: SqlStore, starts: list[tuple[str, str, int]], start_ms: int, options: DemoOptions, reference: Any,
            notes: list[dict[str, Any]], jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    stored = store.windows(model=MODEL)
    out = []
    bounds = [*[m for _n, _v, m in starts][1:], options.total_minutes]
    for (name, version, lo), hi in zip(starts, bounds, strict=True):
        merged = WindowState()
        count = 0
        for key, (state, _final, _w) in stored.items():
            if lo <= (key.window_start - start_ms) // MIN < hi:
                merged.merge(state)
                count += 1
        r = merged.result(reference)
        psi = {k: v for k, v in (r["psi"] or {}).items() if not k.startswith("_") and v is not None}
        top = max(psi, key=lambda k: psi[k]) if psi else None
        in_phase = [n for n in notes if n["type"] == "alert" and lo <= (_parse_ms(n["at"]) - start_ms) // MIN < hi]
        retrains = [j for j in jobs if isinstance(at := j["request"].get("trigger", {}).get("at"), str)
                    and lo <= (_parse_ms(at) - start_ms) // MIN < hi]
        out.append({
            "phase": name, "student_version": version, "minutes": f"{lo}-{hi}", "windows": count, "n": r["n"],
            "n_joined": r["n_joined"], "agreement": r["agreement"], "kl_mean": r["kl_mean"], "ece": r["ece"],
            "psi_max": psi[top] if top else None, "psi_max_feature": top,
            "psi_confidence": (r["psi"] or {}).get("_confidence"), "mia_auc": (r["mia"] or {}).get("auc"),
            "alerts": ", ".join(f"{n['severity']} {n['tier']} {n['status']}" for n in in_phase) or "-",
            "retrain": ", ".join(f"{j['status']} {j['student_version'] or ''}".strip() for j in retrains) or "-",
        })
    return out


def _fmt(value: object, digits_: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits_}f}" if isinstance(value, float) else str(value)


def _print_summary(console: Console, outcome: DemoOutcome, processed: int, workdir: Path) -> None:
    table = Table(title="per phase (windows merged from their stored state)")
    table.add_column("")
    for p in outcome.phases:
        table.add_column(f"{p['phase']}\n{p['student_version']}", justify="right")
    rows: list[tuple[str, Any]] = [
        ("event minutes", lambda p: p["minutes"]), ("predictions", lambda p: str(p["n"])),
        ("with teacher replay", lambda p: str(p["n_joined"])), ("agreement", lambda p: _fmt(p["agreement"])),
        ("KL mean", lambda p: _fmt(p["kl_mean"])), ("ECE", lambda p: _fmt(p["ece"])),
        ("max PSI, pixels", lambda p: "-" if p["psi_max"] is None else f"{p['psi_max']:.2f} {p['psi_max_feature']}"),
        ("PSI, confidence", lambda p: _fmt(p["psi_confidence"], 2)), ("MIA AUC (audits)", lambda p: _fmt(p["mia_auc"])),
        ("alerts", lambda p: p["alerts"]), ("retrain", lambda p: p["retrain"]),
    ]
    for name, cell in rows:
        table.add_row(name, *[cell(p) for p in outcome.phases])
    console.print(table)
    for job in outcome.jobs:
        m = job["metrics"] or {}
        cand, cur = m.get("candidate", {}), m.get("current", {})
        console.print(f"retrain job {job['id'][:16]}…: {job['status']} {job['student_version'] or ''}; held-out agreement "
                      f"{_fmt(cand.get('agreement'))} (candidate) vs {_fmt(cur.get('agreement'))} (current student)")
    console.print(f"{processed} records through Kafka; pages: {len(outcome.pages())}; "
                  f"retrain jobs: {len(outcome.jobs)}; {outcome.seconds:.0f}s in all")
    console.print(f"HTML report: {outcome.report}")
    console.print(f"database: sqlite:///{workdir / 'kdwatch.db'}   registry: {workdir / 'registry'}")


def _parse_ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)
