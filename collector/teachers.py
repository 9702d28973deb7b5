"""Teachers the replayer can run: a TorchScript file, or an HTTP endpoint; for classifiers or language models.

A classifier teacher takes a batch of feature maps and returns one output per row, as logits or as
probabilities (``TeacherOutput``). A sequence teacher (``generative = True``) takes rows of
``{"prompt_tokens": [...], "tokens": [...]}`` and scores the student's tokens teacher-forced after the
prompt: per token its log-probability and its own most likely token (``kind`` "generation").
Failures raise :class:`TeacherError` with a reason the replayer puts on the dead letter.
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
    values: Any  # logits or probs: [float]; generation: {"logprobs": [float], "top1": [int]}
    kind: str  # "logits" | "probs" | "generation"


class Teacher(Protocol):
    def predict(self, rows: Sequence[Mapping[str, Any]]) -> list[TeacherOutput]: ...


def _sequence(row: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    prompt, tokens = row.get("prompt_tokens"), row.get("tokens")
    if not prompt or not tokens:
        raise TeacherError("a sequence teacher needs the prompt's and the student's token ids")
    return list(prompt), list(tokens)


class TorchScriptLanguageModel:
    """A TorchScript causal language model: int64 token ids (1, T) to next-token logits (1, T, V).

    The student's tokens are appended to the prompt and scored in one forward pass: the logits at
    position P + j - 1 predict token j of the student's output (P = prompt length).
    """

    generative = True

    def __init__(self, path: Path, device: str = "cpu") -> None:
        import torch

        self.device = torch.device(device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
            self.module = torch.jit.load(str(path), map_location=self.device).eval()

    def predict(self, rows: Sequence[Mapping[str, Any]]) -> list[TeacherOutput]:
        import torch

        out = []
        for row in rows:
            prompt, tokens = _sequence(row)
            ids = torch.tensor([prompt + tokens], dtype=torch.int64, device=self.device)
            try:
                with torch.no_grad():
                    logits = self.module(ids)[0, len(prompt) - 1 : len(prompt) - 1 + len(tokens)].double()
            except RuntimeError as exc:  # a token id beyond the embedding, a sequence beyond the context
                raise TeacherError(f"the teacher failed on the sequence: {str(exc).strip().splitlines()[-1][:200]}") from None
            if max(tokens) >= logits.shape[-1]:
                raise TeacherError(f"token id {max(tokens)} is beyond the teacher's vocabulary of {logits.shape[-1]}")
            logp = torch.log_softmax(logits, dim=-1)
            chosen = logp.gather(1, torch.tensor(tokens, device=self.device)[:, None])[:, 0]
            out.append(TeacherOutput({"logprobs": [min(v, 0.0) for v in chosen.cpu().tolist()],
                                      "top1": logp.argmax(dim=-1).cpu().tolist()}, "generation"))
        return out


class CompletionsTeacher:
    """An OpenAI-compatible completions server that returns prompt log-probabilities, as vLLM does.

    One POST to ``url`` (…/v1/completions) per batch: ``{"model": M, "prompt": [[prompt + tokens], …],
    "max_tokens": 1, "temperature": 0, "prompt_logprobs": 1}``. Each choice (matched by ``index``)
    carries ``prompt_logprobs``: one entry per prompt token, the first null, each other a map from
    token id (as a string) to ``{"logprob": …, "rank": …}`` holding the actual token and the rank-1
    token. The student's tokens are the last ones of each prompt.
    """

    generative = True

    def __init__(self, url: str, model: str, timeout_s: float = 30.0, headers: Mapping[str, str] | None = None,
                 client: httpx.Client | None = None) -> None:
        self.url, self.model, self.timeout_s = url, model, timeout_s
        self.client = client or httpx.Client(headers=dict(headers or {}))

    def predict(self, rows: Sequence[Mapping[str, Any]]) -> list[TeacherOutput]:
        sequences = [_sequence(row) for row in rows]
        body = {"model": self.model, "prompt": [p + t for p, t in sequences], "max_tokens": 1, "temperature": 0,
                "prompt_logprobs": 1}
        try:
            response = self.client.post(self.url, json=body, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise TeacherError(f"teacher unreachable: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise TeacherError(f"teacher answered HTTP {response.status_code}")
        try:
            choices = sorted(response.json()["choices"], key=lambda c: c["index"])
        except (ValueError, KeyError, TypeError):
            raise TeacherError("teacher answer has no 'choices' with an 'index'") from None
        if len(choices) != len(sequences):
            raise TeacherError(f"teacher answered {len(choices)} choices for {len(sequences)} prompts")
        return [self._scored(choice, prompt, tokens) for choice, (prompt, tokens) in zip(choices, sequences, strict=True)]

    @staticmethod
    def _scored(choice: Any, prompt: list[int], tokens: list[int]) -> TeacherOutput:
        entries = choice.get("prompt_logprobs") if isinstance(choice, dict) else None
        if not isinstance(entries, list) or len(entries) != len(prompt) + len(tokens):
            raise TeacherError("a choice has no prompt_logprobs for every prompt token")
        logprobs, top1 = [], []
        for token, entry in zip(tokens, entries[len(prompt):], strict=True):
            try:
                logprob = float(entry[str(token)]["logprob"])
                best = min(entry.items(), key=lambda item: item[1]["rank"])[0]
                top1.append(int(best))
            except (KeyError, TypeError, ValueError, AttributeError):
                raise TeacherError("a prompt_logprobs entry lacks the token's logprob or a rank-1 token") from None
            if not math.isfinite(logprob):
                raise TeacherError("a prompt log-probability is not finite")
            logprobs.append(min(logprob, 0.0))
        return TeacherOutput({"logprobs": logprobs, "top1": top1}, "generation")


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
