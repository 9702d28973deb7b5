"""Send generated traffic into the three Kafka topics, keyed by request_id."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from kafka import KafkaProducer

from kdwatch.generator import TrafficSpec, generate


def produce_records(
    bootstrap_servers: str,
    topics: dict[str, str],
    records: Iterable[tuple[str, str, bytes]],
    options: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Produce (kind, request_id, value) records to ``topics[kind]``; returns the count sent."""
    producer = KafkaProducer(bootstrap_servers=bootstrap_servers, acks="all", linger_ms=20,
                             batch_size=256 * 1024, compression_type="lz4" if _has_lz4() else None,
                             **(options or {}))
    count = 0
    try:
        for kind, request_id, value in records:
            producer.send(topics[kind], key=request_id.encode(), value=value)
            count += 1
            if progress is not None and count % 5_000 == 0:
                progress(count)
        producer.flush(timeout=120)
    finally:
        producer.close(timeout=30)
    return count


def _has_lz4() -> bool:
    try:
        import lz4  # noqa: F401
    except ImportError:
        return False
    return True


def produce_traffic(settings: Any, spec: TrafficSpec, n: int) -> int:
    topics = {"prediction": settings.topic_predictions, "teacher": settings.topic_teacher, "label": settings.topic_labels}
    return produce_records(settings.bootstrap_servers, topics, generate(spec, n), settings.kafka_options())
