"""Knowledge distillation with PyTorch: the loss, the default student, training and held-out evaluation.

Loss per example (Hinton et al. 2015):

    (1 - a) * CE(y, softmax(z_s)) + a * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

with a = alpha for labelled examples and a = 1 for unlabelled ones (no label: distil only). The T^2
factor keeps the soft term's gradients on the scale of the hard term's as T changes. Teacher
"logits" are the teacher's log-probabilities (exact when it sent logits): softmax is invariant to
the constant that separates them from its real logits.

No I/O here: :func:`distil` takes arrays and returns a trained module with its metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from kdwatch.analyzer.fidelity import agreement_mask, kl_divergence, student_log_probs
from kdwatch.collector.contract import Distribution
from kdwatch.collector.records import TransferRecord, transfer_rank
from kdwatch.errors import ConfigError

# ln(1e-12): the floor for a teacher probability of 0 sent without logits (its term in KL is 0 anyway).
LOG_FLOOR = math.log(1e-12)


class TrainConfig(BaseModel):
    """How the runner distils; every field can be set in the runner's YAML or environment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    alpha: float = Field(default=0.5, ge=0.0, le=1.0)  # weight of the soft (teacher) term; 1 without labels
    temperature: float = Field(default=4.0, gt=0.0)
    epochs: int = Field(default=40, ge=1, le=10_000)
    batch_size: int = Field(default=128, ge=1)
    learning_rate: float = Field(default=3e-3, gt=0.0)
    weight_decay: float = Field(default=1e-4, ge=0.0)
    hidden: tuple[int, ...] = (64,)  # the default student: an MLP over the numeric features
    holdout: float = Field(default=0.2, gt=0.0, lt=1.0)  # share of the transfer set kept for evaluation
    promote_margin: float = Field(default=0.01, ge=-1.0, le=1.0)  # the new student must beat the current one's agreement by this
    min_records: int = Field(default=200, ge=10)
    seed: int = 0
    device: str = "auto"  # auto: CUDA when present, else CPU
    # Entry points ("package.module:function", runner.trainers) a retrain request may name; ``trainer`` runs
    # for every model whose request names none (None: the built-in MLP, for classifiers).
    trainers: tuple[str, ...] = ()
    trainer: str | None = None


def load_train_config(path: Path | None) -> TrainConfig:
    """The training config from YAML (defaults without a file); a bad file names the field."""
    if path is None:
        return TrainConfig()
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"not valid YAML: {exc}") from None
    try:
        return TrainConfig.model_validate(data or {})
    except ValidationError as exc:
        error = exc.errors()[0]
        raise ConfigError(".".join(str(p) for p in error["loc"]) or str(path), error["msg"]) from None


class StudentMLP(nn.Module):
    """Standardise the features with the training split's statistics, then an MLP to logits."""

    def __init__(self, n_features: int, hidden: Sequence[int], n_classes: int,
                 mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features) if mean is None else mean.clone())
        self.register_buffer("std", torch.ones(n_features) if std is None else std.clone())
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # mypy sees registered buffers as Tensor | Module; TorchScript cannot read class-level annotations
        return self.net((x - self.mean) / self.std)  # type: ignore[operator]


def distillation_loss(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, labels: torch.Tensor,
                      alpha: float, temperature: float) -> torch.Tensor:
    """Mean over the batch of the per-example loss above; ``labels`` is -1 where unknown."""
    t = temperature
    soft_teacher = F.log_softmax(teacher_log_probs / t, dim=1)
    soft_student = F.log_softmax(student_logits / t, dim=1)
    kl = (soft_teacher.exp() * (soft_teacher - soft_student)).sum(dim=1)
    labelled = labels >= 0
    ce = F.cross_entropy(student_logits, labels.clamp(min=0), reduction="none")
    weight = torch.where(labelled, torch.full_like(kl, alpha), torch.ones_like(kl))
    per_example = (1.0 - weight) * torch.where(labelled, ce, torch.zeros_like(ce)) + weight * t * t * kl
    return per_example.mean()


@dataclass
class TransferArrays:
    """The transfer set as arrays: numeric features in ``feature_names`` order, teacher and student outputs."""

    feature_names: list[str]
    x: np.ndarray  # (n, f) float32
    teacher_log_probs: np.ndarray  # (n, k)
    teacher_probs: np.ndarray  # (n, k)
    student_probs: np.ndarray  # (n, k): what the current student answered in production
    labels: np.ndarray  # (n,) int, -1 where unknown
    holdout: np.ndarray  # (n,) bool


def to_arrays(records: Sequence[TransferRecord], holdout: float) -> TransferArrays:
    """Numeric features only (a feature missing from a record is NaN, then imputed by the mean).

    The held-out split is chosen by a hash of the request id, so a job re-run on the same records
    evaluates on the same examples.
    """
    if not records:
        raise ValueError("the transfer set is empty")
    if not all(isinstance(r.teacher, Distribution) and isinstance(r.student, Distribution) for r in records):
        raise ValueError("the transfer set holds a generative student's records: the built-in MLP distils classifiers; "
                         "name a trainer entry point for it (README \"Generative students\")")
    classifier = [(r, r.teacher, r.student) for r in records if isinstance(r.teacher, Distribution) and isinstance(r.student, Distribution)]
    k = classifier[0][1].n_classes
    names = sorted({name for r in records for name, v in r.features.items()
                    if isinstance(v, int | float) and not isinstance(v, bool)})
    if not names:
        raise ValueError("the transfer set has no numeric features")
    x = np.full((len(records), len(names)), np.nan, dtype=np.float64)
    index = {name: i for i, name in enumerate(names)}
    for row, r in enumerate(records):
        for name, v in r.features.items():
            i = index.get(name)
            if i is not None and isinstance(v, int | float) and not isinstance(v, bool):
                x[row, i] = float(v)
    if any(t.n_classes != k or s.n_classes != k for _r, t, s in classifier):
        raise ValueError("the transfer set mixes class counts")
    x = np.where(np.isnan(x), np.nanmean(x, axis=0), x)  # every column has a value: its name came from a record
    t_probs = np.stack([t.probs for _r, t, _s in classifier])
    t_log = np.stack([np.maximum(np.log(np.maximum(t.probs, 1e-300)), LOG_FLOOR) if t.log_probs is None else t.log_probs
                      for _r, t, _s in classifier])
    s_probs = np.stack([s.probs for _r, _t, s in classifier])
    labels = np.array([-1 if r.label is None else r.label for r in records], dtype=np.int64)
    cut = round(holdout * 10_000)
    held = np.array([transfer_rank(r.model, r.request_id) % 10_000 < cut for r in records])
    return TransferArrays(names, x.astype(np.float32), t_log, t_probs, s_probs, labels, held)


def fidelity(teacher_probs: np.ndarray, teacher_log: np.ndarray, student_probs: np.ndarray,
             student_log: np.ndarray | None, labels: np.ndarray) -> dict[str, float | int | None]:
    """Agreement and mean KL(teacher || student) as kdwatch's windows define them; accuracy where labelled."""
    agree = agreement_mask(teacher_probs, student_probs)
    kl = kl_divergence(teacher_probs, teacher_log, student_log_probs(student_probs, student_log))
    labelled = labels >= 0
    accuracy = float((np.argmax(student_probs[labelled], axis=1) == labels[labelled]).mean()) if labelled.any() else None
    return {"n": len(agree), "agreement": float(agree.mean()), "kl_mean": float(kl.mean()),
            "n_labeled": int(labelled.sum()), "accuracy": accuracy}


@dataclass
class DistilResult:
    module: StudentMLP
    candidate: dict[str, float | int | None]  # the new student on the held-out split
    current: dict[str, float | int | None]  # the production student on the same split (from its logged outputs)
    promoted: bool
    epochs: list[dict[str, float]]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def distil(data: TransferArrays, config: TrainConfig, on_epoch: Callable[[dict[str, float]], None] | None = None) -> DistilResult:
    """Train a student on the training split, evaluate both students on the held-out split, apply the gate."""
    train, held = ~data.holdout, data.holdout
    if train.sum() < 1 or held.sum() < 1:
        raise ValueError("the transfer set is too small for a training and a held-out split")
    torch.manual_seed(config.seed)
    device = pick_device(config.device)
    x_train = torch.from_numpy(data.x[train])
    mean, std = x_train.mean(dim=0), x_train.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # 1e-6: a constant feature must not divide by zero
    k = data.teacher_probs.shape[1]
    module = StudentMLP(data.x.shape[1], config.hidden, k, mean, std).to(device)
    optimiser = torch.optim.AdamW(module.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    x = x_train.to(device)
    t_log = torch.from_numpy(data.teacher_log_probs[train]).float().to(device)
    y = torch.from_numpy(data.labels[train]).to(device)
    generator = torch.Generator().manual_seed(config.seed)
    x_held = torch.from_numpy(data.x[held]).to(device)
    history: list[dict[str, float]] = []
    for epoch in range(1, config.epochs + 1):
        module.train()
        order = torch.randperm(len(x), generator=generator).to(device)
        total = 0.0
        for start in range(0, len(x), config.batch_size):
            batch = order[start:start + config.batch_size]
            optimiser.zero_grad()
            loss = distillation_loss(module(x[batch]), t_log[batch], y[batch], config.alpha, config.temperature)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(batch)
        module.eval()
        with torch.no_grad():
            log_s = F.log_softmax(module(x_held), dim=1).cpu().double().numpy()
        m = fidelity(data.teacher_probs[held], data.teacher_log_probs[held], np.exp(log_s), log_s, data.labels[held])
        row = {"epoch": float(epoch), "loss": total / len(x), "agreement": float(m["agreement"] or 0.0),
               "kl_mean": float(m["kl_mean"] or 0.0)}
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
    module.eval()
    with torch.no_grad():
        log_s = F.log_softmax(module(x_held), dim=1).cpu().double().numpy()
    candidate = fidelity(data.teacher_probs[held], data.teacher_log_probs[held], np.exp(log_s), log_s, data.labels[held])
    current = fidelity(data.teacher_probs[held], data.teacher_log_probs[held], data.student_probs[held], None, data.labels[held])
    promoted = float(candidate["agreement"] or 0.0) >= float(current["agreement"] or 0.0) + config.promote_margin
    return DistilResult(module.cpu(), candidate, current, promoted, history)
