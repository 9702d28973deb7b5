"""``kdwatch replayer``: run the teacher on a sample of production predictions and publish teacher replays.

It consumes the predictions topic in its own consumer group (replicas share the partitions), keeps a
deterministic sample per model — a request is replayed when a hash of its ``request_id`` falls under
the model's rate, so a re-run replays the same requests — runs the teacher on the prediction's
features, and publishes contract-v1 teacher replays keyed by ``request_id`` to the teacher topic.

- A token bucket caps replays per second: the teacher is protected, consumption waits.
- A failed teacher call is retried with backoff; then each record is tried alone, and those that
  still fail go to the dead-letter topic (``<teacher topic>.DLT``) with the reason in the headers
  (``kdwatch.error.class``: ``teacher_error`` or ``invalid_teacher_output``).
- Offsets are committed after the replays are acknowledged: at least once. A replay sent twice (after
  a crash) is counted as a duplicate by the collector, never as a second join.
- Metrics (registry passed in): kdwatch_replayer_{sampled,replayed,failed,skipped}_total{model},
  kdwatch_replayer_teacher_latency_seconds.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from kafka import KafkaConsumer, KafkaProducer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kdwatch.collector.contract import decode_prediction, decode_teacher
from kdwatch.collector.teachers import Teacher, TeacherError
from kdwatch.errors import ContractError

log = logging.getLogger("kdwatch.replayer")
DLT_SUFFIX = ".DLT"


def sampled(model: str, request_id: str, rate: float) -> bool:
    """Deterministic sampling: the same request is always in (or out of) the sample at a given rate.

    Salted differently from the transfer set's rank, so the two samples are independent.
    """
    digest = hashlib.blake2b(f"replay\x00{model}\x00{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < rate * 2**64


class TokenBucket:
    """At most ``rate`` tokens a second, bursts up to ``burst``; ``acquire`` waits for its tokens."""

    def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate, self.capacity = rate, burst if burst is not None else max(rate, 1.0)
        self.tokens, self.clock, self.sleep = self.capacity, clock, sleep
        self.last = clock()

    def acquire(self, n: float = 1.0) -> float:
        """Take ``n`` tokens, sleeping until they are there; returns the seconds waited."""
        waited = 0.0
        while True:
            now = self.clock()
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
            self.last = now
            # A request larger than the bucket goes through once the bucket is full, leaving a debt.
            need = min(n, self.capacity)
            if self.tokens >= need - 1e-9:  # 1e-9: float sums of small refills must not loop on a rounding error
                self.tokens -= n
                return waited
            pause = (need - self.tokens) / self.rate
            self.sleep(pause)
            waited += pause


@dataclass
class ReplayerConfig:
    bootstrap_servers: str
    predictions_topic: str = "kdwatch.predictions"
    teacher_topic: str = "kdwatch.teacher"
    group_id: str = "kdwatch-replayer"
    teacher_version: str = "teacher"
    sample_rate: float = 0.1  # share of each model's predictions replayed
    model_rates: dict[str, float] = field(default_factory=dict)  # per-model overrides
    max_per_second: float | None = None  # None: no cap
    batch_size: int = 64  # predictions per teacher call
    retries: int = 3  # further attempts of a failed teacher call, with exponential backoff
    backoff_s: float = 0.2
    kafka_options: dict[str, Any] = field(default_factory=dict)

    def rate_of(self, model: str) -> float:
        return self.model_rates.get(model, self.sample_rate)


class Replayer:
    def __init__(self, config: ReplayerConfig, teacher: Teacher, registry: CollectorRegistry | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.config, self.teacher, self.sleep = config, teacher, sleep
        self.bucket = TokenBucket(config.max_per_second) if config.max_per_second else None
        registry = registry or CollectorRegistry()
        self.m_sampled = Counter("kdwatch_replayer_sampled", "predictions chosen for a replay", ["model"], registry=registry)
        self.m_replayed = Counter("kdwatch_replayer_replayed", "teacher replays published", ["model"], registry=registry)
        self.m_failed = Counter("kdwatch_replayer_failed", "sampled predictions dead-lettered", ["model", "reason"],
                                registry=registry)
        self.m_skipped = Counter("kdwatch_replayer_skipped", "predictions not replayed: invalid, audit or no features",
                                 ["reason"], registry=registry)
        self.m_latency = Histogram("kdwatch_replayer_teacher_latency_seconds", "one teacher call (a batch)", registry=registry)
        self.m_lag = Gauge("kdwatch_replayer_lag", "Predictions not yet read by the replayer, per partition (as the "
                           "client last saw the log end)", ["partition"], registry=registry)
        self.m_last_commit = Gauge("kdwatch_replayer_last_commit_timestamp_seconds", "When the replayer last committed "
                                   "its offsets (epoch seconds)", registry=registry)
        self.processed = 0  # predictions consumed
        self.published = 0  # teacher replays acknowledged by the broker

    # ---- the pure part: choose, call the teacher, build replays ----

    def select(self, value: bytes) -> dict[str, Any] | None:
        """The prediction's fields when it is to be replayed; None (and counted) otherwise."""
        try:
            event = decode_prediction(value)
        except ContractError:
            self.m_skipped.labels("invalid").inc()  # the collector dead-letters it with its reason
            return None
        if event.audit is not None:
            self.m_skipped.labels("audit").inc()
            return None
        generative = event.generation is not None
        if generative != bool(getattr(self.teacher, "generative", False)):
            # A classifier teacher cannot score token sequences, nor a language model class features.
            self.m_skipped.labels("generative" if generative else "classifier").inc()
            return None
        if not sampled(event.model, event.request_id, self.config.rate_of(event.model)):
            return None
        row: dict[str, Any] | None = event.features
        if event.generation is not None and event.generation.tokens is not None:
            row = {"prompt_tokens": event.prompt_tokens, "tokens": event.generation.tokens.tolist()} if event.prompt_tokens else None
        if not row:
            self.m_skipped.labels("no_prompt" if generative else "no_features").inc()
            return None
        self.m_sampled.labels(event.model).inc()
        return {"request_id": event.request_id, "model": event.model, "ts": event.ts_ms, "features": row}

    def _call(self, rows: Sequence[Mapping[str, Any]]) -> list[Any]:
        started = time.perf_counter()
        try:
            return self.teacher.predict(rows)
        finally:
            self.m_latency.observe(time.perf_counter() - started)

    def replay(self, chosen: list[tuple[Any, dict[str, Any]]]
               ) -> tuple[list[tuple[str, bytes]], list[tuple[Any, str, str]]]:
        """(replays as (key, value), failures as (source, reason, message)) for (source, prediction) pairs."""
        if not chosen:
            return [], []
        if self.bucket is not None:
            self.bucket.acquire(len(chosen))
        rows = [p["features"] for _src, p in chosen]
        outputs: list[Any] | None = None
        error = ""
        for attempt in range(self.config.retries + 1):
            try:
                outputs = self._call(rows)
                break
            except TeacherError as exc:
                error = str(exc)
                if attempt < self.config.retries:
                    self.sleep(self.config.backoff_s * 2**attempt)
        if outputs is None:  # isolate the records that fail on their own
            log.warning("teacher failed %d times on a batch of %d (%s); trying each record alone",
                        self.config.retries + 1, len(rows), error)
            outputs = []
            for row in rows:
                try:
                    outputs.append(self._call([row])[0])
                except TeacherError as exc:
                    outputs.append(exc)
        replays, failures = [], []
        for (source, prediction), out in zip(chosen, outputs, strict=True):
            if isinstance(out, TeacherError):
                failures.append((source, "teacher_error", str(out)))
                self.m_failed.labels(prediction["model"], "teacher_error").inc()
                continue
            value = orjson.dumps({"request_id": prediction["request_id"], "model": prediction["model"],
                                  "teacher_version": self.config.teacher_version, "ts": prediction["ts"], out.kind: out.values})
            try:
                decode_teacher(value)
            except ContractError as exc:
                failures.append((source, "invalid_teacher_output", f"{exc.reason}: {exc}"))
                self.m_failed.labels(prediction["model"], "invalid_teacher_output").inc()
                continue
            replays.append((prediction["request_id"], value))
            self.m_replayed.labels(prediction["model"]).inc()
        return replays, failures

    # ---- Kafka ----

    def _observe_lag(self, consumer: KafkaConsumer) -> None:
        """The replayer's lag from what the client already knows (the log end of its last fetch): no broker call."""
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is not None:
                self.m_lag.labels(str(tp.partition)).set(max(highwater - consumer.position(tp), 0))

    def run(self, stop: threading.Event | None = None, idle_exit_s: float | None = None) -> None:
        """Consume until ``stop`` is set (or nothing arrived for ``idle_exit_s`` seconds)."""
        stop = stop or threading.Event()
        c = self.config
        consumer = KafkaConsumer(c.predictions_topic, bootstrap_servers=c.bootstrap_servers, group_id=c.group_id,
                                 enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=1_000,
                                 **c.kafka_options)
        producer = KafkaProducer(bootstrap_servers=c.bootstrap_servers, acks="all", linger_ms=10, **c.kafka_options)
        dlt = c.teacher_topic + DLT_SUFFIX
        last_data = time.monotonic()
        try:
            while not stop.is_set():
                batch = consumer.poll(timeout_ms=500)
                self._observe_lag(consumer)
                if not batch:
                    if idle_exit_s is not None and time.monotonic() - last_data > idle_exit_s:
                        return
                    continue
                last_data = time.monotonic()
                chosen = []
                for records in batch.values():
                    for record in records:
                        self.processed += 1
                        prediction = self.select(record.value)
                        if prediction is not None:
                            chosen.append((record, prediction))
                published = []
                for start in range(0, len(chosen), c.batch_size):
                    replays, failures = self.replay(chosen[start:start + c.batch_size])
                    published.append(replays)
                    for key, value in replays:
                        producer.send(c.teacher_topic, key=key.encode(), value=value)
                    for record, reason, message in failures:  # the collector's dead-letter headers, plus who sent it
                        producer.send(dlt, key=record.key, value=record.value, headers=[
                            ("kdwatch.original.topic", record.topic.encode()),
                            ("kdwatch.original.partition", str(record.partition).encode()),
                            ("kdwatch.original.offset", str(record.offset).encode()),
                            ("kdwatch.original.timestamp", str(record.timestamp).encode()),
                            ("kdwatch.error.class", reason.encode()), ("kdwatch.error.message", message[:1000].encode()),
                            ("kdwatch.component", b"replayer")])
                producer.flush(timeout=60)  # acknowledged before the offsets move: at least once
                consumer.commit()
                self.m_last_commit.set(time.time())
                self.published += sum(len(r) for r in published)
        finally:
            producer.close(timeout=10)
            consumer.close()
