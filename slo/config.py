"""SLOs and retrain policies as data: YAML validated into frozen pydantic models at load.

A bad file fails with :class:`ConfigError` naming the field (``slos[0].objective``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdwatch.durations import parse_duration_ms
from kdwatch.errors import ConfigError
from kdwatch.slo.burn import DEFAULT_CONFIDENCE

Duration = Annotated[str, Field(pattern=r"^\s*\d+\s*(ms|s|m|h|d|w)\s*$")]
EVENT_METRICS = ("agreement", "accuracy", "latency", "kl")
# Timeslice metrics and the direction that is good: "le" = good when metric <= threshold.
TIMESLICE_METRICS = {"ece": "le", "kl_mean": "le", "mia.tpr_at_1pct_fpr": "le", "accuracy_delta": "ge", "agreement": "ge",
                     # generative students (README "Window fields")
                     "teacher_ppl": "le", "kl_rev_mean": "le", "seq_agreement": "ge", "token_agreement": "ge"}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EventsSli(_Frozen):
    """OpenSLO Occurrences: good events / total events."""

    metric: Literal["agreement", "accuracy", "latency", "kl", "token_agreement", "kl_rev"]
    threshold: float | None = Field(None, description="latency: ms; kl, kl_rev: nats (good = at or below)")

    @model_validator(mode="after")
    def _threshold(self) -> EventsSli:
        if self.metric in ("latency", "kl", "kl_rev") and self.threshold is None:
            raise ValueError(f"a {self.metric} SLI needs a threshold")
        if self.metric == "kl_rev" and self.threshold is not None and self.threshold < 0:
            raise ValueError("a kl_rev SLI's threshold is >= 0 (nats per token of a sequence)")
        if self.metric in ("agreement", "accuracy", "token_agreement") and self.threshold is not None:
            raise ValueError(f"a {self.metric} SLI takes no threshold")
        return self


class TimeslicesSli(_Frozen):
    """OpenSLO Timeslices: a slice is one stored window, good when its metric meets the threshold."""

    metric: str
    threshold: float
    min_samples: int = Field(1, ge=1)
    margin_over_expected: float | None = Field(
        None, description="psi.<feature> only: bad only when PSI also exceeds psi_expected by this much")

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        if value in TIMESLICE_METRICS or (value.startswith("psi.") and len(value) > 4):
            return value
        raise ValueError(f"unknown timeslice metric {value!r}: one of {sorted(TIMESLICE_METRICS)} or psi.<feature>")


class WindowPair(_Frozen):
    severity: Literal["page", "ticket"]
    long: Duration
    short: Duration
    burn_rate: float = Field(gt=0)


class Alerting(_Frozen):
    windows: tuple[WindowPair, ...] | None = None  # default: the SRE workbook's, scaled to the period
    min_events: int = Field(0, ge=0, description="suppress alerts when the long window has fewer events (slices)")
    confidence: float = Field(DEFAULT_CONFIDENCE, ge=0, lt=1, description=(
        "a pair fires only when the long window's bad fraction is above its threshold at this one-sided "
        "confidence (Wilson lower bound); 0: the plain SRE workbook rule"))
    resolve_hold: Duration | None = Field(None, description=(
        "a firing pair resolves once its short window has stayed at or below the rate this long "
        "(default: the short window's length), or its long window stops burning"))
    repeat_interval: Duration = "4h"
    no_data: Duration | None = Field(None, description="a ticket when the SLI has had no data this long")


class Sli(_Frozen):
    events: EventsSli | None = None
    timeslices: TimeslicesSli | None = None

    @model_validator(mode="after")
    def _one(self) -> Sli:
        if (self.events is None) == (self.timeslices is None):
            raise ValueError("exactly one of events or timeslices")
        return self


class Slo(_Frozen):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    model: str = Field(min_length=1)
    student_version: str | None = None
    objective: float = Field(gt=0, lt=1)
    period: Duration = "30d"
    sli: Sli
    alerting: Alerting = Field(default_factory=lambda: Alerting.model_validate({}))

    @property
    def period_ms(self) -> int:
        return parse_duration_ms(self.period)


class RetrainCondition(_Frozen):
    slo: str | None = None
    severity: Literal["page", "ticket"] = "page"
    psi_feature: str | None = None
    psi_above: float | None = None
    consecutive_windows: int = Field(3, ge=1)
    psi_over_expected: bool = Field(True, description=(
        "compare PSI minus its expectation when nothing drifted ((bins - 1)(1/n + 1/m), the window's "
        "psi_expected) with psi_above, so small windows' sampling noise does not trigger retrains"))

    @model_validator(mode="after")
    def _one(self) -> RetrainCondition:
        if (self.slo is None) == (self.psi_feature is None):
            raise ValueError("a condition names either an slo or a psi_feature")
        if self.psi_feature is not None and self.psi_above is None:
            raise ValueError("a psi condition needs psi_above")
        return self


class RetrainPolicy(_Frozen):
    model: str
    when: tuple[RetrainCondition, ...] = Field(min_length=1)
    cooldown: Duration = "6h"
    # A training entry point, "package.module:function", sent with the retrain webhook; the runner runs it
    # (instead of its built-in MLP) when its own config lists it. Generative students need one.
    trainer: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class SloFile(_Frozen):
    slos: tuple[Slo, ...] = ()
    retrain: tuple[RetrainPolicy, ...] = ()

    @model_validator(mode="after")
    def _references(self) -> SloFile:
        names = [s.name for s in self.slos]
        if len(names) != len(set(names)):
            raise ValueError("SLO names must be unique")
        for policy in self.retrain:
            for cond in policy.when:
                if cond.slo is not None and cond.slo not in names:
                    raise ValueError(f"retrain condition names unknown SLO {cond.slo!r}")
        return self


def _field(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "file"


def parse_slo_file(data: Any) -> SloFile:
    try:
        return SloFile.model_validate(data if data is not None else {})
    except ValidationError as exc:
        error = exc.errors()[0]
        raise ConfigError(_field(tuple(error["loc"])), error["msg"]) from None


def load_slo_file(path: Path) -> SloFile:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"not valid YAML: {exc}") from None
    return parse_slo_file(data)
