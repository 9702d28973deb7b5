"""Token-level fidelity of a generative (language-model) student against its teacher.

Per joined prediction i and position t: s = the student's log-probability of its own token, p = the
teacher's log-probability of that token (teacher-forced on the same prompt), d = p - s, and
a = [teacher's top-1 token = the student's token]. Over N = sum of lengths of the joined predictions:

- token agreement = sum a / N (Wilson 95 % interval over N tokens); sequence agreement = share of
  joined predictions agreeing at every position;
- teacher NLL = sum(-p) / N nats per token (perplexity exp of it), student NLL = sum(-s) / N;
- reverse KL, KL(student || teacher), estimated on the student's own samples: k1 = sum(s - p) / N,
  and the always non-negative k3 = sum(e^c - 1 - c) / N with c = clip(d, -50, 50) (Schulman's
  estimators);
- mean length over every generative prediction of the window, joined or not.

Sums are exact fixed-point integers (analyzer.exact), so the state merges bit for bit in any order.
Per joined sequence, max(mean(s - p), 0) goes into a sketch: the `kl_rev` events SLI counts the
sequences at or under its threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdwatch.analyzer.exact import fixed_sum, fixed_to_float
from kdwatch.analyzer.fidelity import wilson_interval
from kdwatch.analyzer.sketch import QuantileSketch

K3_CLIP = 50.0
FIELDS = ("n_tokens", "token_agreement", "token_agreement_ci", "seq_agreement", "teacher_nll_mean", "teacher_ppl",
          "student_nll_mean", "kl_rev_mean", "kl_rev_k3_mean", "len_mean")


@dataclass
class GenerativeState:
    n_seq: int = 0  # joined generative predictions
    n_seq_agree: int = 0
    n_tokens: int = 0
    n_tokens_agree: int = 0
    teacher_nll: int = 0  # fixed point: sum of -p
    student_nll: int = 0  # sum of -s over joined predictions
    kl_rev: int = 0  # sum of s - p
    kl_rev_k3: int = 0  # sum of e^c - 1 - c
    length_sum: int = 0  # over every generative prediction, joined or not
    length_n: int = 0
    n_audit: int = 0  # generative audit records (membership inference)
    seq_kl: QuantileSketch = field(default_factory=QuantileSketch)  # max(mean(s - p), 0) per joined sequence

    @property
    def active(self) -> bool:
        return self.length_n > 0 or self.n_seq > 0 or self.n_audit > 0

    def add_lengths(self, lengths: Sequence[int]) -> None:
        self.length_sum += int(sum(lengths))
        self.length_n += len(lengths)

    def add_pairs(self, student: Sequence[Any], teacher: Sequence[Any]) -> None:
        """Joined (student generation, teacher generation) pairs of equal lengths (collector.contract.Generation)."""
        if not student:
            return
        lengths = np.array([g.logprobs.shape[0] for g in student])
        s = np.concatenate([g.logprobs for g in student])
        p = np.concatenate([g.logprobs for g in teacher])
        agree = np.concatenate([g.tokens for g in student]) == np.concatenate([g.top1 for g in teacher])
        d = p - s
        c = np.clip(d, -K3_CLIP, K3_CLIP)
        bounds = np.r_[0, np.cumsum(lengths)]
        agree_per_seq = np.add.reduceat(agree.astype(np.int64), bounds[:-1])
        kl_per_seq = np.add.reduceat(s - p, bounds[:-1]) / lengths
        self.n_seq += len(student)
        self.n_seq_agree += int((agree_per_seq == lengths).sum())
        self.n_tokens += int(lengths.sum())
        self.n_tokens_agree += int(agree.sum())
        self.teacher_nll += fixed_sum(-p)
        self.student_nll += fixed_sum(-s)
        self.kl_rev += fixed_sum(s - p)
        self.kl_rev_k3 += fixed_sum(np.expm1(c) - c)
        self.seq_kl.update(np.maximum(kl_per_seq, 0.0))

    def merge(self, other: GenerativeState) -> None:
        for name in ("n_seq", "n_seq_agree", "n_tokens", "n_tokens_agree", "teacher_nll", "student_nll", "kl_rev",
                     "kl_rev_k3", "length_sum", "length_n", "n_audit"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.seq_kl.merge(other.seq_kl)

    def result(self) -> dict[str, Any]:
        """The generative fields (README "Window fields"); all None for a window of a classifier."""
        if not self.active:
            return {name: None for name in FIELDS}
        n = self.n_tokens
        teacher_nll = fixed_to_float(self.teacher_nll) / n if n else None
        ci = wilson_interval(self.n_tokens_agree, n)
        return {
            "n_tokens": n,
            "token_agreement": self.n_tokens_agree / n if n else None,
            "token_agreement_ci": list(ci) if ci is not None else None,
            "seq_agreement": self.n_seq_agree / self.n_seq if self.n_seq else None,
            "teacher_nll_mean": teacher_nll,
            "teacher_ppl": math.exp(teacher_nll) if teacher_nll is not None and teacher_nll < 700 else None,
            "student_nll_mean": fixed_to_float(self.student_nll) / n if n else None,
            "kl_rev_mean": fixed_to_float(self.kl_rev) / n if n else None,
            "kl_rev_k3_mean": fixed_to_float(self.kl_rev_k3) / n if n else None,
            "len_mean": self.length_sum / self.length_n if self.length_n else None,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"n_seq": self.n_seq, "n_seq_agree": self.n_seq_agree, "n_tokens": self.n_tokens,
                "n_tokens_agree": self.n_tokens_agree, "teacher_nll": str(self.teacher_nll),
                "student_nll": str(self.student_nll), "kl_rev": str(self.kl_rev), "kl_rev_k3": str(self.kl_rev_k3),
                "length_sum": self.length_sum, "length_n": self.length_n, "n_audit": self.n_audit,
                "seq_kl": self.seq_kl.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> GenerativeState:
        if data is None:  # stored before generative students existed
            return cls()
        return cls(data["n_seq"], data["n_seq_agree"], data["n_tokens"], data["n_tokens_agree"], int(data["teacher_nll"]),
                   int(data["student_nll"]), int(data["kl_rev"]), int(data["kl_rev_k3"]), data["length_sum"],
                   data["length_n"], data["n_audit"], QuantileSketch.from_dict(data["seq_kl"]))
