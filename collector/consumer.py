"""The Kafka collector: a consumer-group member that joins, windows and stores, exactly once.

Each co-partition ``p`` (partition p of the predictions, teacher and labels topics, which the range
assignor gives to one member) has an engine (collector.live_columns: the columnar engine of `kdwatch
analyze`) whose whole state (windows, join buffer, watermark) and offsets live in the database. A poll's records of ``p`` become one
transaction (PartitionStore.commit_batch, kdwatch.storage.sql.SqlStore); on (re)assignment the member loads ``p`` from the
database and seeks to the stored offsets. So after a crash at any moment the stored aggregates equal
those of an uninterrupted run. Dead letters are produced and flushed before the commit: the
dead-letter topic is at-least-once (its headers carry the original coordinates for de-duplication),
the counters are exactly-once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.partitioner.default import murmur2

from kdwatch.analyzer.drift import Reference
from kdwatch.collector.columns import NEVER
from kdwatch.collector.live_columns import ColumnarUnit
from kdwatch.collector.records import Changes, PartitionSnapshot
from kdwatch.collector.telemetry import CollectorMetrics
from kdwatch.errors import ConfigError, StoreConflict, StoreUnavailable

log = logging.getLogger(__name__)

DLT_SUFFIX = ".DLT"
RECORD = "record"  # the engine meta of a partition stored by the record joiner (before the one engine)
STUCK_AFTER_S = 30.0  # an input with more on the broker that the client does not return for this long: reopen the consumer


class ConsumerStuck(Exception):
    """The Kafka client stopped returning a partition it has records for; the consumer is reopened."""


class PartitionStore(Protocol):
    """Where a collector keeps each co-partition's state and offsets (kdwatch.storage.sql.SqlStore).

    Both methods raise ``StoreUnavailable`` when the database does not answer and ``commit_batch``
    raises ``StoreConflict`` when the stored offsets moved under it (another member owns the partition).
    """

    def load_partition(self, group_id: str, partition: int, topics: Iterable[str]) -> PartitionSnapshot: ...

    def commit_batch(self, group_id: str, partition: int, window_ms: int, changes: Changes,
                     offsets: dict[str, tuple[int | None, int]], transfer_max: int = 100_000) -> None: ...

    def load_engine(self, partition: int) -> tuple[dict[str, Any] | None, list[tuple[str, str, int, bytes]]]: ...


@dataclass(frozen=True)
class Topics:
    predictions: str = "kdwatch.predictions"
    teacher: str = "kdwatch.teacher"
    labels: str = "kdwatch.labels"

    def kinds(self) -> dict[str, str]:
        """topic -> kind of event it carries."""
        return {self.predictions: "prediction", self.teacher: "teacher", self.labels: "label"}


@dataclass
class CollectorConfig:
    bootstrap_servers: str
    group_id: str = "kdwatch-collector"
    topics: Topics = field(default_factory=Topics)
    window_ms: int = 60_000
    grace_ms: int = 600_000
    max_poll_records: int = 5_000
    poll_timeout_ms: int = 500
    session_timeout_ms: int = 10_000
    max_future_ms: int | None = 3_600_000  # event times further ahead of the wall clock are rejected
    kafka_options: dict[str, Any] = field(default_factory=dict)  # security settings and the like
    transfer_per_window: int = 50  # joined predictions sampled per closed window into the transfer set (0: off)
    transfer_max_records: int = 100_000  # per model; the oldest go first
    # An input partition with nothing queued and nothing more to fetch stops holding the merge (and the
    # watermark) back after this long (collector.merge); until then the others wait for it.
    idle_timeout_ms: int = 30_000
    max_queued: int = 20_000  # records queued per input partition before it is paused (memory bound)
    provisional_interval_s: float = 5.0  # how often open windows' states so far are stored


@dataclass
class _Unit:
    """One owned co-partition: its engine and its offsets.

    ``fetched``: per topic, the next offset to queue; ``expected``: the next offset to process (what a
    commit stores); ``committed``: as last committed.
    """

    columnar: ColumnarUnit
    committed: dict[str, int | None]
    expected: dict[str, int]
    fetched: dict[str, int]
    paused: set[str] = field(default_factory=set)
    progress_at: float = field(default_factory=time.monotonic)  # last record processed, or queues empty
    provisional_at: float = 0.0  # when the open windows were last stored
    provisional_stale: bool = False  # records processed since

    @property
    def merge(self) -> Any:  # the queues of the records fetched and not yet processed (collector.live_columns)
        return self.columnar.queues

    @property
    def watermark(self) -> int | None:
        return self.columnar.analyzer.watermark

    @property
    def observed(self) -> dict[str, int]:  # input kind -> newest event time processed
        return {k: v for k, v in self.columnar.analyzer.observed.items() if v != NEVER}

    @property
    def buffered(self) -> int:  # open predictions and waiting replays and labels (the join buffer)
        return self.columnar.buffered


def kafka_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, as the Java client) gives ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def ensure_topics(bootstrap_servers: str, names: list[str], partitions: int, options: dict[str, Any] | None = None,
                  timeout_s: float = 30.0) -> None:
    """Create the topics that are missing, with ``partitions`` partitions each, and wait until the broker serves them.

    A topic just created is not in the broker's metadata at once; a consumer that subscribed in that
    moment was assigned nothing and, in kafka-python 3.0, waited for its next metadata refresh (up to
    5 minutes) before rebalancing: the demo's replayer did, now and then. So this returns only when
    every topic reports each partition with a leader.
    """
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, **(options or {}))
    try:
        existing = set(admin.list_topics())
        missing = [NewTopic(n, partitions, 1) for n in names if n not in existing]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                log.debug("topics created concurrently by another member")
            deadline = time.monotonic() + timeout_s
            while not _served(admin, [t.name for t in missing]):
                if time.monotonic() > deadline:
                    raise ConfigError("topics", f"topics {[t.name for t in missing]} were created but not served within {timeout_s:.0f}s")
                time.sleep(0.1)
    finally:
        admin.close()


def _served(admin: KafkaAdminClient, names: list[str]) -> bool:
    """Every topic known to the broker with all its partitions led."""
    described = admin.describe_topics(names)
    return len(described) == len(names) and all(
        topic["error_code"] == 0 and topic["partitions"]
        and all(p["error_code"] == 0 and p["leader_id"] >= 0 for p in topic["partitions"]) for topic in described)


class Collector:
    """Run with :meth:`run`; stop by setting the ``stop`` event it was given."""

    def __init__(self, config: CollectorConfig, store: PartitionStore, references: dict[str, Reference] | None = None,
                 metrics: CollectorMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.store = store
        self.references = references or {}
        self.kinds = config.topics.kinds()
        self.units: dict[int, _Unit] = {}
        self.processed = 0

    # ---- start-up ----

    def _check_partitions(self, consumer: KafkaConsumer) -> int:
        counts = {}
        for topic in self.kinds:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                raise ConfigError("topics", f"topic {topic!r} does not exist (create it with `kdwatch topics create`)")
            counts[topic] = len(parts)
        if len(set(counts.values())) != 1:
            raise ConfigError("topics", f"the three topics must be co-partitioned (same partition count), got {counts}")
        return next(iter(counts.values()))

    def _consumer(self) -> KafkaConsumer:
        return KafkaConsumer(
            bootstrap_servers=self.config.bootstrap_servers,
            group_id=self.config.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            partition_assignment_strategy=[RangePartitionAssignor],
            max_poll_records=self.config.max_poll_records,
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=16 * 1024 * 1024,
            session_timeout_ms=self.config.session_timeout_ms,
            heartbeat_interval_ms=max(self.config.session_timeout_ms // 3, 100),
            **self.config.kafka_options,
        )

    # ---- assignment ----

    def _sync_assignment(self, consumer: KafkaConsumer) -> None:
        assigned = consumer.assignment()
        owned = {tp.partition for tp in assigned if tp.topic == self.config.topics.predictions}
        for p in list(self.units):
            if p not in owned:
                log.info("partition %d revoked", p)
                del self.units[p]
                if self.metrics is not None:
                    self.metrics.on_revoked(p, self.kinds.values())
        for p in sorted(owned - set(self.units)):
            self._load(consumer, p)
        if self.metrics is not None:
            self.metrics.owned.set(len(self.units))

    def _load(self, consumer: KafkaConsumer, p: int) -> None:
        snapshot = self.store.load_partition(self.config.group_id, p, self.kinds)
        tps = [TopicPartition(t, p) for t in self.kinds]
        beginnings = consumer.beginning_offsets(tps)
        expected: dict[str, int] = {}
        for tp in tps:
            start = snapshot.offsets.get(tp.topic)
            if start is None:
                start = beginnings[tp]
            expected[tp.topic] = start
            if tp in consumer.assignment():
                consumer.seek(tp, start)
        committed = {t: snapshot.offsets.get(t) for t in self.kinds}
        consumer.resume(*[tp for tp in tps if tp in consumer.assignment()])  # a reload starts with empty queues
        meta, blobs = self.store.load_engine(p)
        if (meta is not None and meta.get("engine") == RECORD) or (meta is None and (snapshot.entries or snapshot.windows)):
            raise ConfigError(
                "KDWATCH_GROUP_ID", f"partition {p} of group {self.config.group_id!r} holds open state of the record "
                "joiner, the per-record engine of development builds (KDWATCH_COLLECTOR_ENGINE=record, or a generative "
                "student handed over to it), which kdwatch no longer has: start a new consumer group to read the topics "
                "again (CHANGELOG, one engine)")
        unit = self._columnar_unit(p, meta, blobs)
        self.units[p] = _Unit(unit, committed, expected, dict(expected))
        log.info("partition %d loaded: offsets %s, %d buffered", p, expected, unit.buffered)

    def _columnar_unit(self, p: int, meta: dict[str, Any] | None, blobs: list[tuple[str, str, int, bytes]]) -> ColumnarUnit:
        unit = ColumnarUnit(p, self.config.window_ms, self.config.grace_ms, self.references,
                            {kind: topic for topic, kind in self.kinds.items()}, self.config.idle_timeout_ms / 1000,
                            max_future_ms=self.config.max_future_ms, transfer_per_window=self.config.transfer_per_window)
        unit.restore(meta, blobs)
        return unit

    # ---- the loop ----

    def run(self, stop: threading.Event | None = None, idle_exit_s: float | None = None) -> None:
        """Consume until ``stop`` is set (or nothing arrived for ``idle_exit_s`` seconds)."""
        stop = stop or threading.Event()
        consumer = self._consumer()
        producer = KafkaProducer(bootstrap_servers=self.config.bootstrap_servers, acks="all", linger_ms=5,
                                 max_request_size=16 * 1024 * 1024, **self.config.kafka_options)
        try:
            partitions = self._check_partitions(consumer)
            ensure_topics(self.config.bootstrap_servers, [t + DLT_SUFFIX for t in self.kinds], partitions,
                          self.config.kafka_options)
            consumer.subscribe(list(self.kinds))
            last_data = time.monotonic()
            backoff = 0.5
            while not stop.is_set():
                try:
                    batch = consumer.poll(timeout_ms=self.config.poll_timeout_ms)
                    self._sync_assignment(consumer)
                    self._process(consumer, producer, batch)
                    if batch or not self._caught_up(consumer):
                        last_data = time.monotonic()  # idle means nothing new *and* nothing left to read
                    backoff = 0.5
                    continue_after = None
                except ConsumerStuck as exc:
                    log.warning("%s: reopening the consumer", exc)
                    if self.metrics is not None:
                        self.metrics.reopens.inc()
                    self.units.clear()
                    consumer.close(autocommit=False)
                    consumer = self._consumer()
                    consumer.subscribe(list(self.kinds))
                    continue_after = None
                    continue
                except StoreUnavailable as exc:
                    continue_after = str(exc)
                    self._count_outage("database")
                except (KafkaError, OSError) as exc:
                    continue_after = f"Kafka unavailable ({type(exc).__name__}: {exc})"
                    self._count_outage("kafka")
                if continue_after is not None:
                    # Drop in-memory state (it may be ahead of the database), wait, and resume from
                    # the stored offsets once everything answers again. An outage is not idleness.
                    log.warning("%s; pausing %.1fs", continue_after, backoff)
                    self.units.clear()
                    stop.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
                    last_data = time.monotonic()
                if idle_exit_s is not None and time.monotonic() - last_data > idle_exit_s:
                    break
            for p, unit in self.units.items():  # a clean stop stores the open windows' states so far
                if unit.columnar is not None and unit.provisional_stale:
                    fence: dict[str, tuple[int | None, int]] = {t: (o, o) for t, o in unit.committed.items() if o is not None}
                    self.store.commit_batch(self.config.group_id, p, self.config.window_ms,
                                            Changes(windows=unit.columnar.provisional()), fence)
        finally:
            producer.close(timeout=10)
            consumer.close(autocommit=False)

    def _count_outage(self, dependency: str) -> None:
        if self.metrics is not None:
            self.metrics.pauses.labels(dependency).inc()

    def _caught_up(self, consumer: KafkaConsumer) -> bool:
        """No owned partition is known to have records beyond what was processed.

        A broker that restarts answers no fetches for a while, and a member that joins owns nothing
        until the group has rebalanced: without this, that silence would look like the end of the
        input to ``idle_exit_s``. Records queued in a merge are not processed yet. An unknown high
        watermark counts as caught up, so an input that never answered cannot keep the collector
        running forever.
        """
        assignment = consumer.assignment()
        if not assignment:
            return False  # joining the group, or a rebalance under way: partitions may still come
        for tp in assignment:
            unit = self.units.get(tp.partition)
            highwater = consumer.highwater(tp)
            if unit is None:
                return False
            if highwater is not None and unit.expected[tp.topic] < highwater:
                return False
        return True

    def _process(self, consumer: KafkaConsumer, producer: KafkaProducer, batch: dict[TopicPartition, list[Any]]) -> None:
        if self.metrics is None:
            self._process_units(consumer, producer, batch)
            return
        with self.metrics.batch_seconds.time():
            self._process_units(consumer, producer, batch)

    def _process_units(self, consumer: KafkaConsumer, producer: KafkaProducer, batch: dict[TopicPartition, list[Any]]) -> None:
        by_unit: dict[int, dict[str, list[Any]]] = defaultdict(dict)
        for tp, records in batch.items():
            by_unit[tp.partition][tp.topic] = records
        # Every owned unit, even one without new records: its inputs may have caught up, which
        # can move its watermark and close windows.
        for p in sorted(self.units):
            unit = self.units[p]
            self._queue(consumer, p, unit, by_unit.get(p, {}))
            before = dict(unit.expected)
            advanced, changes = self._step_columnar(p, unit, bool(by_unit.get(p)))
            self._watch_stall(p, unit, bool(advanced))
            self._flow_control(consumer, p, unit)
            if self.metrics is not None:
                self._observe_unit(p, unit, unit.merge.idle())
            if not advanced and changes.watermark is None and not changes.windows:
                continue
            # Offsets not advanced are still compare-and-set (old == new): the fence holds for every write.
            fence = {t: (old, old) for t, old in unit.committed.items() if old is not None and t not in advanced}
            self._dead_letter(producer, changes)
            try:
                self.store.commit_batch(self.config.group_id, p, self.config.window_ms, changes, {**fence, **advanced},
                                        transfer_max=self.config.transfer_max_records)
            except StoreConflict as exc:
                log.warning("dropping partition %d: %s", p, exc)
                del self.units[p]
                continue
            except StoreUnavailable:
                del self.units[p]
                raise
            if self.metrics is not None:
                self.metrics.on_commit(changes.counters, ((dl.source.topic, dl.reason) for dl in changes.dead_letters),
                                       len(changes.closed), time.time())
                self.metrics.on_processed({t: unit.expected[t] - before[t] for t in advanced})
            for topic, (_old, new) in advanced.items():
                unit.committed[topic] = new
            if advanced:
                # A courtesy commit to Kafka so lag tools see progress; the database stays the truth.
                consumer.commit_async({TopicPartition(t, p): _offset_meta(new) for t, (_o, new) in advanced.items()})

    def _step_columnar(self, p: int, unit: _Unit, fetched: bool) -> tuple[dict[str, tuple[int | None, int]], Changes]:
        """One step of the columnar engine; open windows' states so far are stored every ``provisional_interval_s``,
        and once the unit has caught up (a poll brought nothing new), so a quiet stream's windows are up to date."""
        changes, moved = unit.columnar.step()
        unit.provisional_stale |= bool(moved)
        now = time.monotonic()
        if unit.provisional_stale and (not fetched or now - unit.provisional_at >= self.config.provisional_interval_s):
            unit.provisional_at, unit.provisional_stale = now, False
            changes.windows = {k: w for k, w in unit.columnar.provisional().items() if k not in changes.closed}
        advanced = {}
        for topic, new in moved.items():
            self.processed += new - unit.expected[topic]
            unit.expected[topic] = new
            advanced[topic] = (unit.committed[topic], new)
        return advanced, changes

    def _observe_unit(self, p: int, unit: _Unit, idle: dict[str, bool]) -> None:
        assert self.metrics is not None
        queued = {k: unit.merge.queued(k) for k in unit.merge.inputs}
        self.metrics.on_unit(p, unit.buffered, unit.watermark, queued, unit.observed, idle)

    def _queue(self, consumer: KafkaConsumer, p: int, unit: _Unit, topics: dict[str, list[Any]]) -> None:
        """Queue a unit's newly fetched records in its merge, and tell the merge which inputs are at their end."""
        for topic, kind in self.kinds.items():
            fresh = []
            for record in topics.get(topic, ()):
                if record.offset < unit.fetched[topic]:
                    continue  # fetched before our seek: already queued or processed
                if record.offset > unit.fetched[topic] and not self._gap_is_gone(consumer, topic, p, unit.fetched[topic]):
                    # Records fetched from a position we have since rewound from (after a reload):
                    # read again from the stored offset rather than skip what lies between.
                    consumer.seek(TopicPartition(topic, p), unit.fetched[topic])
                    break
                fresh.append(record)
                unit.fetched[topic] = record.offset + 1
            unit.columnar.push(kind, fresh)
            highwater = consumer.highwater(TopicPartition(topic, p))
            unit.merge.set_at_end(kind, highwater is not None and unit.fetched[topic] >= highwater)

    def _watch_stall(self, p: int, unit: _Unit, progressed: bool) -> None:
        """Catch a co-partition whose records wait on an input the client stopped returning.

        An input with nothing queued that is not at its end has records on the broker (or an end the
        client no longer knows) that the client does not return: kafka-python can be left that way
        after an outage and a seek. After ``STUCK_AFTER_S`` without progress the consumer is replaced
        (``ConsumerStuck``: the run loop reopens it and reloads every partition from the database).
        """
        now = time.monotonic()
        if progressed or not unit.merge.queued():
            unit.progress_at = now
            return
        idle = unit.merge.idle()
        waiting = [kind for kind in unit.merge.inputs
                   if not unit.merge.queued(kind) and not idle[kind] and not unit.merge.at_end(kind)]
        stalled = now - unit.progress_at
        if waiting and stalled >= STUCK_AFTER_S:
            raise ConsumerStuck(f"partition {p}: {unit.merge.queued()} records queued and none processed for {stalled:.0f}s, "
                                f"waiting for {', '.join(waiting)} that the client does not return")

    def _flow_control(self, consumer: KafkaConsumer, p: int, unit: _Unit) -> None:
        """Pause an input partition whose queue is full (the merge waits on another), resume it when it drains."""
        for topic, kind in self.kinds.items():
            queued = unit.merge.queued(kind)
            tp = TopicPartition(topic, p)
            if topic not in unit.paused and queued >= self.config.max_queued:
                consumer.pause(tp)
                unit.paused.add(topic)
            elif topic in unit.paused and queued < self.config.max_queued // 2:
                _resume(consumer, tp, unit.fetched[topic])
                unit.paused.discard(topic)

    @staticmethod
    def _gap_is_gone(consumer: KafkaConsumer, topic: str, partition: int, expected: int) -> bool:
        """True when offsets from ``expected`` on were deleted by retention (so nothing can be re-read)."""
        tp = TopicPartition(topic, partition)
        beginning = consumer.beginning_offsets([tp])[tp]
        if beginning > expected:
            log.warning("%s[%d]: offsets %d..%d were deleted before being consumed", topic, partition, expected, beginning - 1)
            return True
        return False

    def _dead_letter(self, producer: KafkaProducer, changes: Changes) -> None:
        if not changes.dead_letters:
            return
        for dl in changes.dead_letters:
            src = dl.source
            headers = [
                ("kdwatch.original.topic", src.topic.encode()),
                ("kdwatch.original.partition", str(src.partition).encode()),
                ("kdwatch.original.offset", str(src.offset).encode()),
                ("kdwatch.original.timestamp", str(src.timestamp_ms).encode()),
                ("kdwatch.error.class", dl.reason.encode()),
                ("kdwatch.error.message", dl.message[:1000].encode()),
            ]
            producer.send(src.topic + DLT_SUFFIX, key=src.key, value=src.value, partition=src.partition, headers=headers)
        try:
            producer.flush(timeout=30)
        except KafkaError as exc:
            raise RuntimeError(f"could not write {len(changes.dead_letters)} dead letters: {exc}") from exc


def _resume(consumer: KafkaConsumer, tp: TopicPartition, position: int) -> None:
    """Resume a paused partition at ``position`` (the next offset to queue).

    kafka-python 3.0 parks what it fetched for a paused partition and hands it back after the resume
    only at a moment its current record slot is empty (``None``); until then the partition counts as
    having data pending and is not fetched. Here that moment never came: with 25,000 predictions per
    partition and empty replay and label topics, every partition stopped for good at the 20,000
    queued (benchmarks/ingest.py hung; tests/integration/test_collector.py reproduces it). So the
    parked data is dropped and the partition sought to where we stand: those records are fetched
    again. With another client version lacking those attributes this is a plain resume and seek.
    """
    consumer.resume(tp)
    fetcher = getattr(consumer, "_fetcher", None)
    for parked in ("_paused_partition_records", "_paused_completed_fetches"):
        held = getattr(fetcher, parked, None)
        if isinstance(held, dict):
            held.pop(tp, None)
    consumer.seek(tp, position)


def _offset_meta(offset: int) -> Any:
    from kafka.structs import OffsetAndMetadata

    return OffsetAndMetadata(offset, "", -1)
