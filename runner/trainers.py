"""The runner's plug-in point: training entry points other than the built-in MLP.

A retrain policy may name an entry point, ``"package.module:function"`` (``trainer:`` in the SLO
YAML); the retrain webhook carries it, and the runner runs it when its own training config lists it
(``trainers:``, or ``trainer:`` as the default for every model), so a webhook can never make the
runner import arbitrary code. The function is called as::

    fn(records: list[TransferRecord], config: TrainConfig, on_epoch: Callable[[dict], None]) -> Candidate

``records`` is the transfer set of the webhook's range (a generative student's records carry
``Generation`` objects and the prompt in ``features["prompt_tokens"]``). The returned candidate is
judged by the same promotion gate as the built-in student (held-out agreement of the candidate against
the current student's, by ``promote_margin``) and registered the same way (TorchScript, metadata).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kdwatch.collector.records import TransferRecord

Trainer = Callable[..., "Candidate"]


@dataclass
class Candidate:
    """A trained student and how it and the current student do on the same held-out records."""

    module: Any  # a torch.nn.Module that TorchScript can compile
    candidate: dict[str, Any]  # held-out metrics of the new student; "agreement" is required
    current: dict[str, Any]  # the production student's on the same records; "agreement" is required
    architecture: dict[str, Any]  # what it is, for the registry's metadata
    features: list[str] = field(default_factory=list)  # its inputs, in order
    epochs: list[dict[str, float]] = field(default_factory=list)
    n_train: int = 0
    n_holdout: int = 0


def promotes(candidate: dict[str, Any], current: dict[str, Any], margin: float) -> bool:
    """The promotion gate: the candidate's held-out agreement beats the current student's by ``margin``."""
    return float(candidate["agreement"]) >= float(current["agreement"]) + margin


def load_trainer(spec: str) -> Trainer:
    """The function ``spec`` ("package.module:function") names; ValueError saying what is missing."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"trainer {spec!r} is not package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"trainer {spec!r}: cannot import {module_name} ({exc})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"trainer {spec!r}: {module_name} has no function {name}")
    return function  # type: ignore[no-any-return]


def run_trainer(spec: str, records: Sequence[TransferRecord], config: Any, on_epoch: Callable[[dict[str, float]], None]
                ) -> Candidate:
    result = load_trainer(spec)(list(records), config, on_epoch)
    if not isinstance(result, Candidate):
        raise ValueError(f"trainer {spec!r} returned {type(result).__name__}, not a kdwatch.runner.trainers.Candidate")
    for side in ("candidate", "current"):
        if "agreement" not in getattr(result, side):
            raise ValueError(f"trainer {spec!r}: the {side} metrics lack 'agreement' (the promotion gate needs it)")
    return result
