"""Teachers the replayer can run: a TorchScript file, or an HTTP endpoint.

A teacher takes a batch of feature maps and returns one output per row, as logits or as
probabilities (``TeacherOutput``). Failures raise :class:`TeacherError` with a reason the replayer
puts on the dead letter.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from kdwatch.errors import KdwatchError


class TeacherError(KdwatchError):
    """The teacher could not answer (unreachable, an error status, a malformed answer)."""


@dataclass(frozen=True)
class TeacherOutput:
    values: list[float]
    kind: str  # "logits" | "probs"


class Teacher(Protocol):
    def predict(self, rows: Sequence[Mapping[str, Any]]) -> list[TeacherOutput]: ...


class TorchScriptTeacher:
    """A TorchScript module mapping float32 (n, f) features, in ``features`` order, to logits (n, k).

    ``features`` defaults to the list in a ``metadata.json`` beside the file (kdwatch's registry
    layout). A feature missing from a prediction is a per-record failure, not a silent zero.
    """

    def __init__(self, path: Path, features: Sequence[str] | None = None, device: str = "cpu") -> None:
        import torch

        if features is None:
            meta = path.parent / "metadata.json"
            if not meta.is_file():
                raise TeacherError(f"{path}: give the feature order (--features) or put a metadata.json with 'features' beside it")
            features = json.loads(meta.read_text())["features"]
        self.features = list(features)
        self.device = torch.device(device)
        with warnings.catch_warnings():  # TorchScript is deprecated upstream but is the format asked for (see runner.registry)
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
            self.module = torch.jit.load(str(path), map_location=self.device).eval()

    def predict(self, rows: Sequence[Mapping[str, Any]]) -> list[TeacherOutput]:
        import torch

        matrix = []
        for row in rows:
            missing = [name for name in self.features if not isinstance(row.get(name), int | float)]
            if missing:
                raise TeacherError(f"feature(s) {missing[:5]} missing or not numeric")
            matrix.append([float(row[name]) for name in self.features])
        with torch.no_grad():
            logits = self.module(torch.tensor(matrix, dtype=torch.float32, device=self.device)).double().cpu().tolist()
        return [TeacherOutput(row, "logits") for row in logits]


class HttpTeacher:
    """POST ``{"instances": [{"features": {...}}, ...]}``; the answer is ``{"predictions": [{"logits"|"probs": [...]}, ...]}``.

    The KServe v1 / TensorFlow Serving request shape, one output per instance, in order.
    """

    def __init__(self, url: str, timeout_s: float = 10.0, headers: Mapping[str, str] | None = None,
                 client: httpx.Client | None = None) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.client = client or httpx.Client(headers=dict(headers or {}))

    def predict(self, rows: Sequence[Mapping[str, Any]]) -> list[TeacherOutput]:
        try:
            response = self.client.post(self.url, json={"instances": [{"features": dict(r)} for r in rows]}, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise TeacherError(f"teacher unreachable: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise TeacherError(f"teacher answered HTTP {response.status_code}")
        try:
            predictions = response.json()["predictions"]
        except (ValueError, KeyError, TypeError):
            raise TeacherError("teacher answer has no 'predictions' list") from None
        if not isinstance(predictions, list) or len(predictions) != len(rows):
            raise TeacherError(f"teacher answered {len(predictions) if isinstance(predictions, list) else 'no'} "
                               f"predictions for {len(rows)} instances")
        out = []
        for p in predictions:
            kind = "logits" if isinstance(p, dict) and "logits" in p else "probs"
            values = p.get(kind) if isinstance(p, dict) else None
            if not isinstance(values, list) or not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
                raise TeacherError("a teacher prediction has no finite logits or probs")
            out.append(TeacherOutput([float(v) for v in values], kind))
        return out
