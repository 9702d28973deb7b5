"""The root of kdwatch's exception tree.

KdwatchError
├── ContractError      an event breaks contract v1 (collector.contract)
├── SchemaError        a Parquet file's columns cannot hold contract v1 (collector.columnar)
├── ConfigError        a setting or file is invalid at start-up (kdwatch.settings)
├── StoreConflict      another collector took over a partition (storage)
└── DevKafkaError      the local development broker failed (kdwatch.devkafka)
"""

from __future__ import annotations


class KdwatchError(Exception):
    """Base class of every error kdwatch raises on purpose."""


class ContractError(KdwatchError):
    """An event does not satisfy the event contract.

    ``reason`` is a stable machine-readable code (``invalid_json``, ``missing_field``, ...) that is
    written to the dead-letter headers and counted; ``str(error)`` is the human-readable detail.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __reduce__(self) -> tuple[type[ContractError], tuple[str, str]]:  # survives a trip between processes
        return type(self), (self.reason, self.message)


class SchemaError(KdwatchError):
    """A Parquet input whose columns cannot hold the event contract: the whole file is refused."""


class ConfigError(KdwatchError):
    """Invalid configuration; ``field`` names the offending setting."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, str]]:
        return type(self), (self.field, self.message)


class StoreConflict(KdwatchError):
    """The stored offsets moved under us: another consumer owns the partition now."""


class StoreUnavailable(KdwatchError):
    """The database did not answer (down, restarting, unreachable); the caller may retry later."""


class DevKafkaError(KdwatchError):
    """The local development broker could not be fetched, formatted or started."""
