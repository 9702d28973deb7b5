"""The producer SDK: log a service's predictions, labels and audit replays to kdwatch through Kafka.

    from kdwatch.producer import PredictionLogger

    logger = PredictionLogger("kafka:9092", model="fraud-distil", student_version="s7")
    logger.log(request_id, probs=probs, features={"amount": 12.5}, latency_ms=3.1)
    logger.log_label(request_id, label=1)        # later, when the truth is known
    logger.close(timeout=5)                      # also done at interpreter exit

Each call validates the record against contract v1 with kdwatch's own decoder, then appends it to a
bounded in-memory queue and returns: serialisation, batching, compression and the network happen on
a background thread, so the serving path never waits for Kafka. In ``strict`` mode an invalid record
raises :class:`~kdwatch.errors.ContractError`; otherwise (production) it is counted and dropped with a
log line naming the reason. When the queue is full the oldest record is dropped and counted: a
broker outage costs monitoring data, never serving latency.
"""

from __future__ import annotations

import atexit
import logging
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from kdwatch.collector.contract import decode_label, decode_prediction
from kdwatch.errors import ContractError

log = logging.getLogger("kdwatch.producer")
LOG_EVERY_S = 10.0  # at most one log line per drop reason this often, so a bad caller cannot flood the logs


@dataclass
class LoggerStats:
    queued: int = 0
    sent: int = 0
    invalid: int = 0  # dropped by validation (production mode)
    overflow: int = 0  # dropped because the queue was full (the oldest go)
    failed: int = 0  # the broker refused or the send timed out


def _as_list(values: Any) -> Any:
    """numpy arrays and tensors to plain lists (JSON); other sequences as they are."""
    tolist = getattr(values, "tolist", None)
    return tolist() if tolist is not None else values


def _reachable(servers: str | Sequence[str], timeout_s: float = 1.0) -> bool:
    """Whether any bootstrap server accepts a TCP connection."""
    for server in [servers] if isinstance(servers, str) else servers:
        for address in server.split(","):
            host, _, port = address.strip().rpartition(":")
            try:
                with socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=timeout_s):
                    return True
            except (OSError, ValueError):
                continue
    return False


class PredictionLogger:
    """A bounded, non-blocking logger of contract-v1 records (see the module docstring)."""

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        model: str,
        student_version: str,
        *,
        predictions_topic: str = "kdwatch.predictions",
        labels_topic: str = "kdwatch.labels",
        strict: bool = False,
        queue_size: int = 100_000,
        linger_ms: int = 50,
        compression_type: str | None = "lz4",
        kafka_options: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.model, self.student_version, self.strict = model, student_version, strict
        self.topics = {"prediction": predictions_topic, "label": labels_topic}
        self.stats = LoggerStats()
        self._clock = clock
        self._queue: deque[tuple[str, str, dict[str, Any]]] = deque()
        self._capacity = queue_size
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._last_log: dict[str, float] = {}
        self._producer: Any = None
        self._producer_options = {"bootstrap_servers": bootstrap_servers, "linger_ms": linger_ms, "acks": "all",
                                  "compression_type": compression_type, **(kafka_options or {})}
        self._sender = threading.Thread(target=self._run, name="kdwatch-prediction-logger", daemon=True)
        self._sender.start()
        # Flush at interpreter exit without keeping the logger alive (a weak reference).
        ref = weakref.ref(self)
        self._atexit = lambda: (lambda me: me.close(timeout=5.0) if me is not None else None)(ref())
        atexit.register(self._atexit)

    # ---- the serving thread's side: validate and enqueue, nothing else ----

    def log(self, request_id: str, *, probs: Any = None, logits: Any = None, features: Mapping[str, Any] | None = None,
            latency_ms: float | None = None, label: int | None = None, segment: str | None = None,
            ts_ms: int | None = None, generation: Mapping[str, Any] | None = None, prompt_tokens: Any = None) -> bool:
        """A prediction; True when queued (False: dropped as invalid in production mode).

        A generative student passes ``generation={"tokens": [...], "logprobs": [...]}`` (its output token ids
        and its log-probability of each) instead of ``probs``/``logits``, and ``prompt_tokens`` (the prompt's
        token ids) when a teacher replayer is to score its output.
        """
        record: dict[str, Any] = {"request_id": request_id, "model": self.model, "student_version": self.student_version,
                                  "ts": self._now() if ts_ms is None else ts_ms}
        if probs is not None:
            record["probs"] = _as_list(probs)
        if logits is not None:
            record["logits"] = _as_list(logits)
        if generation is not None:
            record["generation"] = {name: _as_list(values) for name, values in generation.items()}
        if prompt_tokens is not None:
            record["prompt_tokens"] = _as_list(prompt_tokens)
        if features is not None:
            record["features"] = dict(features)
        if latency_ms is not None:
            record["latency_ms"] = latency_ms
        if label is not None:
            record["label"] = label
        if segment is not None:
            record["segment"] = segment
        return self._enqueue("prediction", request_id, record)

    def log_audit(self, request_id: str, *, member: bool, label: int | None = None, probs: Any = None, logits: Any = None,
                  ts_ms: int | None = None, generation: Mapping[str, Any] | None = None) -> bool:
        """An audit replay: the student's output on a known training member (or a known outsider).

        A classifier's carries the record's ``label``; a generative student's the audited text's ``generation``
        (its tokens and the student's log-probabilities of them) and no label.
        """
        record: dict[str, Any] = {"request_id": request_id, "model": self.model, "student_version": self.student_version,
                                  "ts": self._now() if ts_ms is None else ts_ms, "audit": "member" if member else "nonmember"}
        if label is not None:
            record["label"] = label
        if generation is not None:
            record["generation"] = {name: _as_list(values) for name, values in generation.items()}
        if probs is not None:
            record["probs"] = _as_list(probs)
        if logits is not None:
            record["logits"] = _as_list(logits)
        return self._enqueue("prediction", request_id, record)

    def log_label(self, request_id: str, label: int, ts_ms: int | None = None) -> bool:
        """The true class of an earlier prediction, when it becomes known."""
        record = {"request_id": request_id, "model": self.model, "label": label, "ts": self._now() if ts_ms is None else ts_ms}
        return self._enqueue("label", request_id, record)

    def _now(self) -> int:
        return int(self._clock() * 1000)

    def _enqueue(self, kind: str, key: str, record: dict[str, Any]) -> bool:
        try:
            (decode_prediction if kind == "prediction" else decode_label)(record)
        except ContractError as exc:
            if self.strict:
                raise
            with self._lock:
                self.stats.invalid += 1
            self._log_drop(exc.reason, f"dropped an invalid {kind} ({exc.reason}): {exc}")
            return False
        with self._lock:
            if len(self._queue) >= self._capacity:
                self._queue.popleft()
                self.stats.overflow += 1
                overflowed = True
            else:
                overflowed = False
            self._queue.append((kind, key, record))
            self.stats.queued += 1
            self._idle.clear()
        if overflowed:
            self._log_drop("overflow", f"queue full ({self._capacity}): dropped the oldest record; {self.stats.overflow} so far")
        self._wake.set()
        return True

    def _log_drop(self, reason: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last_log.get(reason, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._last_log[reason] = now
            log.warning("%s", message)

    # ---- the background sender ----

    def _run(self) -> None:
        from kafka import KafkaProducer
        from kafka.errors import KafkaError

        producer = None
        while producer is None:
            # A plain TCP probe first: kafka-python leaks a socket when its bootstrap fails.
            reachable = _reachable(self._producer_options["bootstrap_servers"])
            try:
                producer = KafkaProducer(**self._producer_options) if reachable else None
            except KafkaError as exc:
                reachable, producer = False, None
                self._log_drop("connect", f"cannot reach Kafka ({exc}); records wait in the queue, the oldest dropped when full")
            if producer is None:
                if not reachable:
                    self._log_drop("connect", "no bootstrap server reachable; records wait in the queue, the oldest dropped when full")
                if self._closing.wait(1.0):
                    return
        self._producer = producer
        try:
            while True:
                with self._lock:
                    batch = list(self._queue)
                    self._queue.clear()
                    if not batch:
                        self._idle.set()
                if not batch:
                    if self._closing.is_set():
                        break
                    self._wake.wait(0.1)
                    self._wake.clear()
                    continue
                for kind, key, record in batch:
                    future = producer.send(self.topics[kind], key=key.encode(), value=orjson.dumps(record))
                    future.add_callback(self._sent).add_errback(self._failed)
        finally:
            producer.flush(timeout=5)
            producer.close(timeout=5)
            self._idle.set()

    def _sent(self, _metadata: Any) -> None:
        self.stats.sent += 1

    def _failed(self, exc: BaseException) -> None:
        self.stats.failed += 1
        self._log_drop("failed", f"Kafka refused a record: {exc}")

    # ---- lifecycle ----

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far was sent and acknowledged; False on timeout."""
        deadline = time.monotonic() + timeout
        if not self._idle.wait(timeout) or self._producer is None:
            return False
        from kafka.errors import KafkaTimeoutError

        try:
            self._producer.flush(timeout=max(deadline - time.monotonic(), 0.0))
        except KafkaTimeoutError:
            return False
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued (waiting at most ``timeout`` seconds), then stop. Idempotent."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._wake.set()
        self._sender.join(timeout)
        atexit.unregister(self._atexit)
        with self._lock:
            left = len(self._queue)
        if left or self._sender.is_alive():
            log.warning("closed with %d record(s) not handed to Kafka within %.1fs", left, timeout)

    def __enter__(self) -> PredictionLogger:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
