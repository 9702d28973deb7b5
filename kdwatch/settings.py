"""Settings of the collector and CLI, from KDWATCH_* environment variables (pydantic-settings).

A bad value fails at start-up with a :class:`ConfigError` naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kdwatch.durations import parse_duration_ms
from kdwatch.errors import ConfigError
from kdwatch.secrets import webhook_secret_key

DEFAULT_DATABASE_URL = "sqlite:///kdwatch.db"


class Settings(BaseSettings):
    """Every KDWATCH_<FIELD> variable; see the README's configuration table."""

    model_config = SettingsConfigDict(env_prefix="KDWATCH_", extra="ignore")

    database_url: SecretStr = SecretStr(DEFAULT_DATABASE_URL)
    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = Field("kdwatch-collector", min_length=1, max_length=256)
    topic_predictions: str = "kdwatch.predictions"
    topic_teacher: str = "kdwatch.teacher"
    topic_labels: str = "kdwatch.labels"
    window: str = "1m"
    grace: str = "10m"
    max_poll_records: int = Field(5_000, ge=1, le=100_000)
    session_timeout: str = "10s"
    # An input partition that has nothing queued and nothing more to fetch stops holding the others back
    # after this long (README "Join and windows"); until then the collector waits for it.
    idle_timeout: str = "30s"
    # The collector has one engine (collector.live_columns): "columnar" is the only value, kept so existing
    # configurations start; "record" (the per-record joiner of development builds) fails naming the field.
    collector_engine: Literal["columnar"] = "columnar"
    max_future: str = "1h"
    transfer_per_window: int = Field(50, ge=0, le=10_000)
    transfer_max_records: int = Field(100_000, ge=1)
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None

    # The REST API: writes need the key; reads too when read_token_required.
    api_key: SecretStr | None = Field(None, min_length=16)
    api_read_token_required: bool = False

    # The live SLO engine's receivers (all optional).
    alert_webhook_url: str | None = None
    alert_webhook_secret: SecretStr | None = None
    retrain_webhook_url: str | None = None
    retrain_webhook_secret: SecretStr | None = None
    alertmanager_url: str | None = None
    group_wait: str = "30s"
    group_interval: str = "5m"
    engine_interval: str = "5s"
    external_url: str = ""

    # The training runner: the secret the retrain webhooks are signed with, and where students are registered.
    runner_webhook_secret: SecretStr | None = None
    registry_dir: str = "registry"

    @field_validator("alert_webhook_secret", "retrain_webhook_secret", "runner_webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            webhook_secret_key(value.get_secret_value())  # whsec_ + base64 of 24-64 bytes, or a ValueError
        return value

    @field_validator("window", "grace", "session_timeout", "idle_timeout", "max_future", "group_wait", "group_interval", "engine_interval")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration_ms(value)
        return value

    @property
    def window_ms(self) -> int:
        return parse_duration_ms(self.window)

    @property
    def grace_ms(self) -> int:
        return parse_duration_ms(self.grace)

    @property
    def idle_timeout_ms(self) -> int:
        return parse_duration_ms(self.idle_timeout)

    @property
    def session_timeout_ms(self) -> int:
        return parse_duration_ms(self.session_timeout)

    def kafka_options(self) -> dict[str, Any]:
        """Security options for kafka-python clients (empty for PLAINTEXT)."""
        options: dict[str, Any] = {}
        if self.kafka_security_protocol != "PLAINTEXT":
            options["security_protocol"] = self.kafka_security_protocol
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "sasl_mechanism"):
            value = getattr(self, f"kafka_{name}")
            if value is not None:
                options[name] = value
        if self.kafka_sasl_username is not None:
            options["sasl_plain_username"] = self.kafka_sasl_username
        if self.kafka_sasl_password is not None:
            options["sasl_plain_password"] = self.kafka_sasl_password.get_secret_value()
        return options


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment plus explicit overrides; ConfigError names a bad field."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error["loc"]) or "settings"
        raise ConfigError(f"KDWATCH_{field.upper()}", error["msg"]) from None
