"""``kdwatch demo --generative``: a distilled language model watched token by token, through a real local Kafka broker.

1. Train a byte-level causal language model teacher (a GRU) on text available offline: the standard
   library's documentation as ``pydoc`` renders it, and hex dumps of the bytecode of some of its
   modules. Distil a smaller student from it on the documentation only (soft next-byte targets).
2. Start the local broker, the collector, the teacher replayer (running the teacher's TorchScript
   export, ``TorchScriptLanguageModel``, on half the predictions), the live SLO engine and the runner.
3. Serve the student through the SDK (``PredictionLogger.log(generation=..., prompt_tokens=...)``):
   two hours of event time, prompts from the documentation, then from hex dumps (the prompts' domain
   shifts). Token agreement drops and the teacher's perplexity of the student's output rises; the
   timeslice SLOs page; the page sends a signed retrain webhook naming the trainer entry point
   ``kdwatch.runner.lm:distil_causal_lm``; the runner distils a candidate from the transfer set and
   gates it.
4. Print a per-phase summary of the token-level fields.
"""

from __future__ import annotations

import binascii
import importlib
import inspect
import marshal
import pydoc
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from kdwatch.analyzer.window import WindowState
from kdwatch.collector.consumer import DLT_SUFFIX, CollectorConfig, Topics, ensure_topics
from kdwatch.collector.replayer import Replayer, ReplayerConfig
from kdwatch.collector.teachers import TorchScriptLanguageModel
from kdwatch.demo import MIN, LocalServer, _parse_ms, _print_note, _wait
from kdwatch.devkafka import DevKafka
from kdwatch.producer import PredictionLogger
from kdwatch.runner.distill import TrainConfig
from kdwatch.runner.lm import sample, train_lm, windows
from kdwatch.runner.registry import Registry
from kdwatch.secrets import new_webhook_secret
from kdwatch.slo.dispatch import Receiver
from kdwatch.slo.live import LiveConfig
from kdwatch.storage.jobs import JobStore
from kdwatch.storage.sql import SqlStore
from kdwatch.wiring import build_collector, build_live_engine, build_runner, open_store, runner_app, store_slos

MODEL = "docs-assistant"
TRAINER = "kdwatch.runner.lm:distil_causal_lm"
DOC_MODULES = ("json", "collections", "itertools", "functools", "pathlib", "string", "textwrap", "heapq", "bisect", "csv",
               "statistics", "fractions", "decimal", "shlex", "glob", "fnmatch")
HEX_MODULES = ("json.decoder", "textwrap", "heapq", "bisect", "fnmatch", "shlex", "glob", "string")


@dataclass(frozen=True)
class GenerativeOptions:
    clean_minutes: int = 60
    total_minutes: int = 120
    per_minute: int = 40
    chunk_minutes: int = 5
    prompt_bytes: int = 24
    new_tokens: int = 16
    teacher_rate: float = 0.5
    teacher_steps: int = 500
    student_steps: int = 300
    runner: TrainConfig = field(default_factory=lambda: TrainConfig(hidden=(96,), epochs=3, learning_rate=5e-3,
                                                                    min_records=100, trainers=(TRAINER,)))
    job_timeout_s: float = 120.0


@dataclass
class _Run:
    topics: Topics
    store: SqlStore
    jobs: JobStore
    teacher: Any
    student: Any
    texts: dict[str, list[bytes]]
    clean: dict[str, float]
    collector: Any = None
    replayer: Any = None
    start_ms: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)


def corpus() -> dict[str, list[bytes]]:
    """Offline text in two domains: the standard library's documentation, and hex dumps of compiled modules."""
    docs = [pydoc.render_doc(importlib.import_module(m), renderer=pydoc.plaintext).encode("ascii", "replace")  # type: ignore[attr-defined]
            for m in DOC_MODULES]
    dumps = []
    for name in HEX_MODULES:
        blob = marshal.dumps(compile(inspect.getsource(importlib.import_module(name)), name, "exec"))
        digits = binascii.hexlify(blob).decode()
        dumps.append("\n".join(" ".join(digits[i + j : i + j + 4] for j in range(0, 32, 4))
                               for i in range(0, len(digits), 32)).encode())
    return {"docs": docs, "hex": dumps}


def run_generative_demo(home: Path, options: GenerativeOptions | None = None, console: Console | None = None) -> list[dict[str, Any]]:
    """Start (or reuse) the local broker, run the story, stop what was started here; the per-phase rows."""
    console = console or Console()
    options = options or GenerativeOptions()
    home.mkdir(parents=True, exist_ok=True)
    broker = DevKafka(home / "kafka")
    started_here = broker.info() is None
    began = time.monotonic()
    with console.status("starting the local Apache Kafka broker (KRaft)..."):
        bootstrap = broker.start().bootstrap
    try:
        rows = story(home / f"generative-{int(time.time())}", bootstrap, options, console, began)
    finally:
        if started_here:
            broker.stop()
    console.print(f"{time.monotonic() - began:.0f}s in all")
    return rows


def story(workdir: Path, bootstrap: str, options: GenerativeOptions, console: Console, began: float | None = None
          ) -> list[dict[str, Any]]:
    """The whole story against the broker at ``bootstrap``, in ``workdir``: the per-phase rows."""
    began = time.monotonic() if began is None else began
    workdir.mkdir(parents=True)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    texts = corpus()
    with console.status("training a byte-level language model teacher and distilling a smaller student on the docs..."):
        teacher = train_lm(texts["docs"] + texts["hex"], 160, options.teacher_steps)
        student = train_lm(texts["docs"], 96, options.student_steps, teacher=teacher)
    registry = Registry(workdir / "registry")
    registry.register(MODEL, "s1", student, {"parent_version": None, "note": "distilled on the documentation"})
    registry.promote(MODEL, "s1")
    teacher_file = Registry(workdir / "teachers").register("lm-teacher", "t1", teacher, {}) / "model.torchscript"
    clean = _measure(teacher, student, texts["docs"], options)
    console.print(f"teacher and student trained ({time.monotonic() - began:.0f}s); on documentation prompts the student's "
                  f"tokens agree with the teacher's top-1 on {clean['token_agreement']:.3f}, teacher perplexity "
                  f"{clean['teacher_ppl']:.1f}")
    db_url = f"sqlite:///{workdir / 'kdwatch.db'}"
    store = open_store(db_url)
    secret = new_webhook_secret()
    with LocalServer(runner_app(build_runner(open_store(db_url), secret, workdir / "registry", options.runner,
                                         poll_interval_s=0.2))) as runner:
        run = _start(workdir.name, bootstrap, store, teacher, student, texts, clean, teacher_file, options,
                     runner.url + "/webhooks/retrain", secret, console)
        start_ms = int(time.time() * 1000) - 3 * 3_600_000
        run.start_ms = start_ms = start_ms - start_ms % MIN
        run.threads[-1].start()
        try:
            _serve(run, bootstrap, options, console, start_ms)
            time.sleep(1.0)
            _wait(lambda: not any(j["status"] in ("queued", "running") for j in run.jobs.list(MODEL)),
                  options.job_timeout_s, "the retrain job")
        finally:
            run.stop.set()
            for thread in run.threads:
                thread.join(30)
    rows = _phases(run, start_ms, options)
    _print_summary(console, rows, run, workdir)
    store.close()
    return rows


def _measure(teacher: Any, student: Any, texts: list[bytes], options: GenerativeOptions) -> dict[str, float]:
    """Token agreement and teacher perplexity of the student's samples after ``texts`` prompts, offline."""
    prompts = windows(texts, options.prompt_bytes, 400, np.random.default_rng(99))
    tokens, _lp = sample(student, prompts, options.new_tokens, torch.Generator().manual_seed(99))
    ids = torch.cat([prompts, tokens], dim=1)
    with torch.no_grad():
        logp = torch.log_softmax(teacher(ids[:, :-1]).double(), dim=-1)[:, options.prompt_bytes - 1 :]
    chosen = logp.gather(2, tokens[:, :, None])[:, :, 0]
    return {"token_agreement": float((logp.argmax(-1) == tokens).double().mean()),
            "teacher_ppl": float(torch.exp(-chosen.mean()))}


def _start(run_name: str, bootstrap: str, store: SqlStore, teacher: Any, student: Any, texts: dict[str, list[bytes]],
           clean: dict[str, float], teacher_file: Path, options: GenerativeOptions, retrain_url: str, secret: str,
           console: Console) -> _Run:
    topics = Topics(f"{run_name}.predictions", f"{run_name}.teacher", f"{run_name}.labels")
    names = [topics.predictions, topics.teacher, topics.labels]
    ensure_topics(bootstrap, names + [t + DLT_SUFFIX for t in names], partitions=2)
    # Windows are good while token agreement stays within 8 points of the clean level and the teacher's
    # perplexity of the student's output within twice it (measured above, before any traffic).
    slices = {"period": "1d", "objective": 0.95, "alerting": {"min_events": 5}}
    store_slos(store, {
        "slos": [{"name": "token-agreement", "model": MODEL, **slices, "sli": {"timeslices": {
                     "metric": "token_agreement", "threshold": round(clean["token_agreement"] - 0.08, 3), "min_samples": 50}}},
                 {"name": "teacher-perplexity", "model": MODEL, **slices, "sli": {"timeslices": {
                     "metric": "teacher_ppl", "threshold": round(2 * clean["teacher_ppl"], 1), "min_samples": 50}}}],
        "retrain": [{"model": MODEL, "when": [{"slo": "token-agreement", "severity": "page"}], "trainer": TRAINER}],
    })
    collector = build_collector(CollectorConfig(bootstrap, group_id=f"{run_name}-collector", topics=topics, grace_ms=3 * MIN,
                                                transfer_per_window=50, idle_timeout_ms=1_000), store, {})
    replayer = Replayer(ReplayerConfig(bootstrap, topics.predictions, topics.teacher, group_id=f"{run_name}-replayer",
                                       teacher_version="t1", sample_rate=options.teacher_rate),
                        TorchScriptLanguageModel(teacher_file))
    engine = build_live_engine(store, LiveConfig(retrain_webhook=Receiver("retrain", retrain_url, secret)))
    run = _Run(topics, store, JobStore(store.engine), teacher, student, texts, clean)

    def engine_loop() -> None:
        while not run.stop.is_set():
            for note in engine.run_once():
                run.notes.append(note)
                _print_note(console, note, run.start_ms)
            run.stop.wait(0.3)
        engine.close()

    run.threads = [threading.Thread(target=collector.run, kwargs={"stop": run.stop}, daemon=True),
                   threading.Thread(target=replayer.run, kwargs={"stop": run.stop}, daemon=True),
                   threading.Thread(target=engine_loop, daemon=True)]
    for thread in run.threads[:-1]:
        thread.start()
    run.collector, run.replayer = collector, replayer
    return run


def _serve(run: _Run, bootstrap: str, options: GenerativeOptions, console: Console, start_ms: int) -> None:
    """Prompts from the docs, then from hex dumps; the student samples, the SDK logs each generation with its prompt."""
    rng = np.random.default_rng(7)
    generator = torch.Generator().manual_seed(7)
    sent = 0
    with PredictionLogger(bootstrap, MODEL, "s1", predictions_topic=run.topics.predictions, strict=True) as logger:
        for minute in range(0, options.total_minutes, options.chunk_minutes):
            domain = "docs" if minute < options.clean_minutes else "hex"
            if minute == options.clean_minutes:
                console.print(f"[bold]event minute {minute}: the prompts shift from documentation to hex dumps[/]")
            count = options.chunk_minutes * options.per_minute
            prompts = windows(run.texts[domain], options.prompt_bytes, count, rng)
            tokens, logprobs = sample(run.student, prompts, options.new_tokens, generator)
            for i in range(count):
                ts = start_ms + minute * MIN + i * (MIN // options.per_minute)
                logger.log(f"{domain}-{minute}-{i}", ts_ms=ts, latency_ms=float(rng.lognormal(4.0, 0.3)),
                           generation={"tokens": tokens[i], "logprobs": logprobs[i].clamp(max=0.0)},
                           prompt_tokens=prompts[i], features={"domain": domain})
            logger.flush(timeout=60)
            sent += count
            _wait_for(run, sent)


def _wait_for(run: _Run, sent: int) -> None:
    """Each chunk is read by the replayer and consumed by the collector before the next is sent."""
    _wait(lambda: run.replayer.processed >= sent, 60, "the replayer to read the chunk")
    _wait(lambda: run.collector.processed >= sent + run.replayer.published, 60, "the collector to consume the chunk")


def _phases(run: _Run, start_ms: int, options: GenerativeOptions) -> list[dict[str, Any]]:
    stored = run.store.windows(model=MODEL)
    rows = []
    for name, lo, hi in (("documentation prompts", 0, options.clean_minutes),
                         ("hex-dump prompts", options.clean_minutes, options.total_minutes)):
        merged = WindowState()
        for key, (state, _final, _w) in stored.items():
            if lo <= (key.window_start - start_ms) // MIN < hi:
                merged.merge(state)
        r = merged.result()
        pages = [n for n in run.notes if n["type"] == "alert" and n["status"] == "firing" and n["severity"] == "page"
                 and lo <= (_parse_ms(n["at"]) - start_ms) // MIN < hi]
        retrains = [n for n in run.notes if n["type"] == "retrain" and lo <= (_parse_ms(n["at"]) - start_ms) // MIN < hi]
        rows.append({"phase": name, "minutes": f"{lo}-{hi}", **{k: r[k] for k in (
            "n", "n_joined", "n_tokens", "token_agreement", "seq_agreement", "teacher_ppl", "student_nll_mean",
            "kl_rev_mean", "kl_rev_k3_mean", "len_mean")},
            "pages": ", ".join(sorted({n["slo"] for n in pages})) or "-", "retrain webhooks": len(retrains)})
    return rows


def _print_summary(console: Console, rows: list[dict[str, Any]], run: _Run, workdir: Path) -> None:
    table = Table(title="per phase (windows merged from their stored state)")
    table.add_column("")
    for row in rows:
        table.add_column(f"{row['phase']}\nminutes {row['minutes']}", justify="right")
    for name in [k for k in rows[0] if k not in ("phase", "minutes")]:
        table.add_row(name, *[f"{row[name]:.3f}" if isinstance(row[name], float) else str(row[name]) for row in rows])
    console.print(table)
    for job in run.jobs.list(MODEL):
        m = job["metrics"] or {}
        console.print(f"retrain job {job['id'][:16]}… ({TRAINER}): {job['status']} {job['student_version'] or ''}; held-out "
                      f"token agreement {m.get('candidate', {}).get('agreement', float('nan')):.3f} (candidate) vs "
                      f"{m.get('current', {}).get('agreement', float('nan')):.3f} (current student)"
                      + (f"; {job['error']}" if job.get("error") else ""))
    console.print(f"database: sqlite:///{workdir / 'kdwatch.db'}   registry: {workdir / 'registry'}")
