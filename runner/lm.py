"""Small causal language models on bytes: the generative demo's teacher and students, and a trainer entry point.

``CausalLM`` maps byte ids (B, T) to next-byte logits (B, T, 256) with a GRU; TorchScript compiles it,
so the replayer runs a teacher as ``TorchScriptLanguageModel`` and the registry stores students as it
stores the MLP. ``distil_causal_lm`` is a training entry point for the runner (runner.trainers): it
distils a new student from a generative transfer set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from kdwatch.collector.contract import Generation
from kdwatch.collector.records import TransferRecord, transfer_rank
from kdwatch.runner.trainers import Candidate

VOCAB = 256  # bytes


class CausalLM(nn.Module):
    def __init__(self, hidden: int = 128, embed: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, embed)
        self.gru = nn.GRU(embed, hidden, batch_first=True)
        self.out = nn.Linear(hidden, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        states, _ = self.gru(self.embed(ids))
        return self.out(states)


def windows(texts: Sequence[bytes], length: int, count: int, rng: np.random.Generator) -> torch.Tensor:
    """``count`` random byte windows of ``length`` from ``texts`` (each text longer than ``length``)."""
    usable = [t for t in texts if len(t) > length]
    picks = rng.integers(0, len(usable), count)
    rows = []
    for i in picks:
        text = usable[int(i)]
        start = int(rng.integers(0, len(text) - length))
        rows.append(list(text[start : start + length]))
    return torch.tensor(rows, dtype=torch.int64)


def train_lm(texts: Sequence[bytes], hidden: int, steps: int, *, teacher: nn.Module | None = None, batch: int = 32,
             length: int = 64, learning_rate: float = 1e-2, seed: int = 0) -> CausalLM:
    """A language model on ``texts``: next-byte cross-entropy, or with ``teacher`` its soft next-byte distribution (KD)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = CausalLM(hidden)
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    for _ in range(steps):
        ids = windows(texts, length + 1, batch, rng)
        logits = model(ids[:, :-1])
        if teacher is None:
            loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        else:
            with torch.no_grad():
                target = torch.log_softmax(teacher(ids[:, :-1]), dim=-1)
            loss = nn.functional.kl_div(torch.log_softmax(logits, dim=-1), target, log_target=True, reduction="batchmean")
        optimiser.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
    return model.eval()


def sample(model: Any, prompts: torch.Tensor, n_tokens: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``n_tokens`` after each prompt (B, P) at temperature 1: the tokens (B, n) and their log-probabilities."""
    ids = prompts
    tokens, logprobs = [], []
    with torch.no_grad():
        for _ in range(n_tokens):
            logp = torch.log_softmax(model(ids)[:, -1].double(), dim=-1)
            nxt = torch.multinomial(logp.exp(), 1, generator=generator)
            tokens.append(nxt[:, 0])
            logprobs.append(logp.gather(1, nxt)[:, 0])
            ids = torch.cat([ids, nxt], dim=1)
    return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1)


def _sequences(records: Sequence[TransferRecord]) -> list[tuple[list[int], np.ndarray, np.ndarray, np.ndarray, bool]]:
    """(prompt, student tokens, teacher top1, student logprobs, held out) of the generative records usable here."""
    out = []
    for r in records:
        prompt = r.features.get("prompt_tokens")
        if not (isinstance(r.student, Generation) and isinstance(r.teacher, Generation) and prompt):
            raise ValueError("distil_causal_lm needs a generative transfer set with prompts (prompt_tokens)")
        assert r.student.tokens is not None and r.teacher.top1 is not None
        if max(max(prompt), int(r.student.tokens.max()), int(r.teacher.top1.max())) >= VOCAB:
            raise ValueError(f"distil_causal_lm models bytes: a token id of request {r.request_id!r} is >= {VOCAB}")
        out.append((list(prompt), r.student.tokens, r.teacher.top1, r.student.logprobs, transfer_rank(r.model, r.request_id) % 10 < 2))
    return out


def _expected_agreement(model: nn.Module, rows: list[tuple[list[int], np.ndarray, np.ndarray, np.ndarray, bool]]) -> float:
    """Mean over the student's positions of the model's probability of the teacher's top-1 token (teacher-forced)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for prompt, tokens, top1, _lp, _held in rows:
            ids = torch.tensor([prompt + tokens.tolist()[:-1]])
            logp = torch.log_softmax(model(ids)[0, len(prompt) - 1 :].double(), dim=-1)
            total += float(logp.gather(1, torch.from_numpy(top1)[:, None])[:, 0].exp().sum())
            n += len(top1)
    return total / n


def distil_causal_lm(records: list[TransferRecord], config: Any, on_epoch: Callable[[dict[str, float]], None]) -> Candidate:
    """A runner trainer entry point (``kdwatch.runner.lm:distil_causal_lm``) for byte-level generative students.

    Trains a ``CausalLM`` (hidden size ``config.hidden[0]``) to produce the teacher's top-1 token at every
    position of the logged continuations, teacher-forced after their prompts. Both students are judged
    on the held-out records by token agreement as kdwatch's windows count it, in expectation for the
    candidate (its probability of the teacher's token: it samples at temperature 1) and as logged for
    the current student (its sampled token is the teacher's top-1).
    """
    rows = _sequences(records)
    train, held = [r for r in rows if not r[4]], [r for r in rows if r[4]]
    if not train or not held:
        raise ValueError("the transfer set is too small for a training and a held-out split")
    torch.manual_seed(config.seed)
    model = CausalLM(config.hidden[0] if config.hidden else 128)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    order = np.random.default_rng(config.seed)
    epochs: list[dict[str, float]] = []
    for epoch in range(1, config.epochs + 1):
        model.train()
        losses = []
        for i in order.permutation(len(train)):
            prompt, tokens, top1, _lp, _h = train[int(i)]
            ids = torch.tensor([prompt + tokens.tolist()[:-1]])
            logits = model(ids)[0, len(prompt) - 1 :]
            loss = nn.functional.cross_entropy(logits, torch.from_numpy(top1))
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            losses.append(float(loss.detach()))
        model.eval()
        row = {"epoch": float(epoch), "loss": float(np.mean(losses)), "agreement": _expected_agreement(model, held)}
        epochs.append(row)
        on_epoch(row)
    current = float(np.mean(np.concatenate([tokens == top1 for _p, tokens, top1, _lp, _h in held])))
    candidate = {"n": len(held), "agreement": epochs[-1]["agreement"]}
    return Candidate(model, candidate, {"n": len(held), "agreement": current},
                     {"type": "causal-lm-gru", "vocab": VOCAB, "hidden": config.hidden[0] if config.hidden else 128},
                     ["prompt_tokens"], epochs, len(train), len(held))
