"""The composition root: the one place that builds kdwatch's long-running parts from settings.

The CLI (``kdwatch collect``, ``engine``, ``serve``, ``runner``) and the demo both call these, so a
part is wired the same way everywhere (the store migrated before use, the SLO engine re-reading the
SLOs the API edits, the API's readiness and lag sources). Nothing here starts a thread or a server:
callers decide when to run what they get back.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from kdwatch.analyzer.drift import Reference
from kdwatch.collector.consumer import Collector, CollectorConfig, Topics
from kdwatch.collector.telemetry import CollectorMetrics
from kdwatch.durations import parse_duration_ms
from kdwatch.errors import ConfigError
from kdwatch.settings import Settings
from kdwatch.slo.config import SloFile, load_slo_file, parse_slo_file
from kdwatch.slo.dispatch import Dispatcher, Receiver
from kdwatch.slo.live import LiveConfig, LiveEngine, receivers_of
from kdwatch.slo.telemetry import EngineMetrics
from kdwatch.storage.jobs import JobStore
from kdwatch.storage.slo_store import SloSqlStore
from kdwatch.storage.sql import SqlStore

if TYPE_CHECKING:  # the API pulls in FastAPI and the runner PyTorch: imported when built, not before
    from fastapi import FastAPI

    from kdwatch.collector.teachers import Teacher
    from kdwatch.runner.distill import TrainConfig
    from kdwatch.runner.service import Runner


def open_store(database_url: str | SecretStr) -> SqlStore:
    """The store at ``database_url``, migrated to the current schema."""
    url = database_url.get_secret_value() if isinstance(database_url, SecretStr) else database_url
    store = SqlStore.from_url(url)
    store.migrate()
    return store


def collector_config(settings: Settings, **overrides: Any) -> CollectorConfig:
    """The collector's configuration from settings; ``overrides`` replace single fields (the demo's topics)."""
    fields: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers, "group_id": settings.group_id,
        "topics": Topics(settings.topic_predictions, settings.topic_teacher, settings.topic_labels),
        "window_ms": settings.window_ms, "grace_ms": settings.grace_ms, "max_poll_records": settings.max_poll_records,
        "session_timeout_ms": settings.session_timeout_ms, "idle_timeout_ms": settings.idle_timeout_ms,
        "max_future_ms": parse_duration_ms(settings.max_future),
        "kafka_options": settings.kafka_options(), "transfer_per_window": settings.transfer_per_window,
        "transfer_max_records": settings.transfer_max_records,
    }
    return CollectorConfig(**{**fields, **overrides})


def build_collector(config: CollectorConfig, store: SqlStore, references: Mapping[str, Reference] | None = None,
                    registry: CollectorRegistry | None = None) -> Collector:
    """A collector over ``store``, with the PSI references stored there unless ``references`` are given.

    With ``registry``, its self-metrics (kdwatch.collector.telemetry) are registered there.
    """
    return Collector(config, store, dict(references) if references is not None else store.references(),
                     metrics=CollectorMetrics(registry) if registry is not None else None)


def live_config(settings: Settings) -> LiveConfig:
    """Where the SLO engine sends notifications and retrain webhooks, from settings."""

    def receiver(name: str, url: str | None, secret: SecretStr | None, group_interval_ms: int | None = None) -> Receiver | None:
        if url is None:
            return None
        return Receiver(name, url, secret.get_secret_value() if secret is not None else None, group_interval_ms=group_interval_ms)

    return LiveConfig(
        alert_webhook=receiver("alert-webhook", settings.alert_webhook_url, settings.alert_webhook_secret,
                               parse_duration_ms(settings.group_interval)),
        retrain_webhook=receiver("retrain", settings.retrain_webhook_url, settings.retrain_webhook_secret),
        alertmanager_url=settings.alertmanager_url, group_wait_ms=parse_duration_ms(settings.group_wait),
        external_url=settings.external_url)


def store_slos(store: SqlStore, slos: Path | Mapping[str, Any]) -> None:
    """Replace the stored SLO document with a file's or a document's (validated first; the API may edit it later)."""
    parsed = load_slo_file(slos) if isinstance(slos, Path) else parse_slo_file(dict(slos))
    document = parsed.model_dump(mode="json", exclude_none=True) if isinstance(slos, Path) else dict(slos)
    SloSqlStore(store.engine).put_slo_document(document, int(time.time() * 1000))


def build_live_engine(store: SqlStore, config: LiveConfig, registry: CollectorRegistry | None = None) -> LiveEngine:
    """The live SLO engine over the stored windows, re-reading the stored SLOs every cycle (hot reload).

    With ``registry``, its self-metrics (kdwatch.slo.telemetry) are registered there. Raises ``ConfigError``
    when no SLOs are stored yet.
    """
    slo_store = SloSqlStore(store.engine)
    document = slo_store.get_slo_document()
    if document is None:
        raise ConfigError("--slo", "no SLOs stored yet: pass an SLO file (or PUT /v1/slos/{name})")

    def load_slos() -> SloFile:
        return parse_slo_file(slo_store.get_slo_document() or {})

    client = httpx.Client()
    dispatcher = Dispatcher(slo_store, receivers_of(config), client)
    return LiveEngine(parse_slo_file(document), store, slo_store, dispatcher, config, client=client, load_slos=load_slos,
                      metrics=EngineMetrics(registry) if registry is not None else None)


def build_api(store: SqlStore, settings: Settings | None = None) -> FastAPI:
    """The REST API, reports and /metrics over ``store``.

    With ``settings``: their API key and read-token rule, and Kafka in /readyz and the lag gauge.
    Without (the demo): no key, and the database is the only dependency checked.
    """
    from kdwatch.api import ApiSettings, create_app
    from kdwatch.lag import kafka_readiness, lag_source

    if settings is None:
        return create_app(store, ApiSettings())
    api_key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    api_settings = ApiSettings(api_key=api_key, read_token_required=settings.api_read_token_required)
    return create_app(store, api_settings, readiness=kafka_readiness(settings.bootstrap_servers, settings.kafka_options()),
                      lag=lag_source(settings.bootstrap_servers, store, settings.kafka_options()))


def runner_secret(settings: Settings) -> str:
    """The secret retrain webhooks are verified with; ``ConfigError`` naming the setting when it is not set."""
    if settings.runner_webhook_secret is None:
        raise ConfigError("KDWATCH_RUNNER_WEBHOOK_SECRET", "the runner verifies every retrain webhook: set the shared secret")
    return settings.runner_webhook_secret.get_secret_value()


def build_runner(store: SqlStore, webhook_secret: str, registry_dir: Path, train: TrainConfig, **options: Any) -> Runner:
    """The training runner over ``store``; ``options`` are further ``RunnerConfig`` fields (poll interval, progress)."""
    from kdwatch.runner.service import Runner, RunnerConfig

    return Runner(store, JobStore(store.engine), RunnerConfig(webhook_secret, registry_dir, train, **options))


def runner_app(runner: Runner) -> FastAPI:
    """The runner's HTTP app (``POST /webhooks/retrain``)."""
    from kdwatch.runner.service import create_runner_app

    return create_runner_app(runner)



def build_teacher(*, torchscript: Path | None = None, url: str | None = None, lm_torchscript: Path | None = None,
                  completions_url: str | None = None, model: str | None = None, features: str | None = None) -> Teacher:
    """The replayer's teacher: exactly one of a TorchScript or HTTP classifier, a TorchScript causal LM, or an
    OpenAI-compatible completions server (``model`` names what it runs); ``ConfigError`` naming the options otherwise."""
    from kdwatch.collector.teachers import CompletionsTeacher, HttpTeacher, TorchScriptLanguageModel, TorchScriptTeacher

    given = [t for t in (torchscript, url, lm_torchscript, completions_url) if t is not None]
    if len(given) != 1:
        raise ConfigError("--teacher-torchscript/--teacher-url/--teacher-lm-torchscript/--teacher-completions-url",
                          "give exactly one teacher")
    if torchscript is not None:
        return TorchScriptTeacher(torchscript, features.split(",") if features else None)
    if lm_torchscript is not None:
        return TorchScriptLanguageModel(lm_torchscript)
    if completions_url is not None:
        if not model:
            raise ConfigError("--teacher-model", "name the model the completions server is to run")
        return CompletionsTeacher(completions_url, model)
    assert url is not None
    return HttpTeacher(url)


def model_rates_of(items: list[str]) -> dict[str, float]:
    """Per-model sample rates from MODEL=RATE strings; ``ConfigError`` naming --rate on a bad one."""
    rates: dict[str, float] = {}
    for item in items:
        name, _, value = item.rpartition("=")
        try:
            rates[name] = float(value)
        except ValueError:
            raise ConfigError("--rate", f"{item!r} is not MODEL=RATE") from None
        if not name or not 0.0 <= rates[name] <= 1.0:
            raise ConfigError("--rate", f"{item!r} is not MODEL=RATE with a rate in [0, 1]")
    return rates
