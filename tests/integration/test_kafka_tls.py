"""Kafka over TLS: the SDK produces and the collector consumes through the broker's SSL listener,
configured the way a user does (KDWATCH_KAFKA_SECURITY_PROTOCOL, KDWATCH_KAFKA_SSL_CAFILE)."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
from kafka import KafkaConsumer
from kafka.errors import KafkaConfigurationError, KafkaError

from kdwatch.collector.consumer import CollectorConfig
from kdwatch.producer import PredictionLogger
from kdwatch.settings import load_settings
from kdwatch.storage.sql import SqlStore
from tests.integration.helpers import TEST_IDLE_MS, new_topics, run_collector_until

TS = 1_795_000_030_000


def test_the_sdk_and_the_collector_work_over_tls(kafka: str, kafka_tls: tuple[str, str], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    bootstrap, cafile = kafka_tls
    monkeypatch.setenv("KDWATCH_KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("KDWATCH_KAFKA_SSL_CAFILE", cafile)
    settings = load_settings(bootstrap_servers=bootstrap)
    options = settings.kafka_options()
    assert options == {"security_protocol": "SSL", "ssl_cafile": cafile}
    topics = new_topics(kafka, partitions=2)  # created over plaintext: the same broker, another listener
    with PredictionLogger(bootstrap, "m", "s1", predictions_topic=topics.predictions, kafka_options=options,
                          strict=True) as logger:
        for i in range(300):
            logger.log(f"r{i}", probs=[0.8, 0.2], ts_ms=TS + i * 10)
        assert logger.flush(30)
    assert logger.stats.sent == 300

    store = SqlStore.from_url(f"sqlite:///{tmp_path / 'k.db'}")
    store.migrate()
    run_collector_until(CollectorConfig(bootstrap, idle_timeout_ms=TEST_IDLE_MS, group_id="tls-" + topics.predictions, topics=topics,
                                        kafka_options=options), store, 300)
    assert sum(state.n for state, _f, _w in store.windows().values()) == 300
    store.close()


def test_a_client_that_does_not_trust_the_certificate_is_refused(kafka_tls: tuple[str, str]) -> None:
    bootstrap, cafile = kafka_tls
    host, port = bootstrap.rsplit(":", 1)
    # The refusal is the certificate check, nothing else: the same handshake succeeds with the broker's CA.
    trusted = ssl.create_default_context(cafile=cafile)
    trusted.check_hostname = False  # the self-signed certificate names no host; the chain is what is checked here
    with socket.create_connection((host, int(port)), timeout=10) as raw, trusted.wrap_socket(raw) as tls:
        assert tls.version() is not None
    untrusted = ssl.create_default_context()  # the system trust store does not hold the broker's certificate
    untrusted.check_hostname = False
    with socket.create_connection((host, int(port)), timeout=10) as raw, pytest.raises(ssl.SSLCertVerificationError):
        untrusted.wrap_socket(raw)
    # And a Kafka client configured that way gets no connection (a valid configuration: the error is the broker's).
    with pytest.raises(KafkaError) as refused:
        KafkaConsumer(bootstrap_servers=bootstrap, security_protocol="SSL", request_timeout_ms=3000,
                      bootstrap_timeout_ms=3000)
    assert not isinstance(refused.value, KafkaConfigurationError)
