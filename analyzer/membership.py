"""Membership-inference risk from audit replays of known members and non-members.

Three attacks score each audit record (higher = "member"):
- loss (Yeom et al. 2018): ln p_student[label];
- confidence: max p;
- modified entropy (Song & Mittal 2021): -Mentr, Mentr = -(1-p_y) ln p_y - sum_{i!=y} p_i ln(1-p_i).
For each: AUC (Mann-Whitney with ties counted 1/2, equal to scikit-learn's roc_auc_score), the
membership advantage max(TPR - FPR), and the largest TPR at FPR <= 1% and <= 0.1% (Carlini et al.
2022) with 95% Clopper-Pearson intervals.
Scores are kept (audit traffic is small) so results are exact; past ``MAX_EXACT`` records per state
a deterministic sample by request hash is kept instead (documented approximation, still mergeable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LOG_FLOOR = 1e-12
MAX_EXACT = 100_000
ATTACKS = ("loss", "confidence", "mentropy")


def attack_scores(probs: np.ndarray, log_probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Scores of the three attacks for stacked student distributions (n, K) and true labels (n,)."""
    rows = np.arange(labels.shape[0])
    p_y = probs[rows, labels]
    loss = log_probs[rows, labels]
    confidence = probs.max(axis=1)
    log_one_minus = np.log(np.maximum(1.0 - probs, LOG_FLOOR))
    others = (probs * log_one_minus).sum(axis=1) - p_y * log_one_minus[rows, labels]
    mentr = -(1.0 - p_y) * np.log(np.maximum(p_y, LOG_FLOOR)) - others
    return {"loss": loss, "confidence": confidence, "mentropy": -mentr}


def clopper_pearson(k: int, n: int, level: float = 0.95) -> list[float] | None:
    if n == 0:
        return None
    alpha = 1 - level
    from scipy.stats import beta  # imported when needed: scipy.stats takes ~0.8 s to import

    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return [low, high]


def roc_points(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, tp counts) at every distinct threshold, predicting member when score >= threshold."""
    scores = np.concatenate([member_scores, nonmember_scores])
    is_member = np.concatenate([np.ones(member_scores.size, bool), np.zeros(nonmember_scores.size, bool)])
    order = np.argsort(-scores, kind="mergesort")
    scores, is_member = scores[order], is_member[order]
    tp = np.cumsum(is_member)
    fp = np.cumsum(~is_member)
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]
    tp = np.r_[0, tp[last_of_tie]]
    fp = np.r_[0, fp[last_of_tie]]
    return fp / nonmember_scores.size, tp / member_scores.size, tp


def attack_result(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> dict[str, Any]:
    n1, n0 = member_scores.size, nonmember_scores.size
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([member_scores, nonmember_scores]))
    auc = (ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
    fpr, tpr, tp = roc_points(member_scores, nonmember_scores)
    out: dict[str, Any] = {"auc": float(auc), "advantage": float(np.max(tpr - fpr))}
    for key, limit in (("tpr_at_1pct_fpr", 0.01), ("tpr_at_0_1pct_fpr", 0.001)):
        ok = fpr <= limit
        best = int(np.argmax(np.where(ok, tpr, -1.0)))
        out[key] = float(tpr[best])
        out[f"{key}_ci"] = clopper_pearson(int(tp[best]), n1)
    return out


def _hash_rank(request_id: str) -> int:
    # FNV-1a 64: a stable hash across processes (Python's hash() is salted per process).
    h = 0xCBF29CE484222325
    for byte in request_id.encode():
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


@dataclass
class MembershipState:
    """Audit records' attack scores: (hash, member, loss, confidence, mentropy) rows."""

    rows: list[tuple[int, bool, float, float, float]] = field(default_factory=list)
    # Hash threshold of the deterministic sample; 2**64 keeps everything (exact mode).
    threshold: int = 2**64
    n_member_total: int = 0
    n_nonmember_total: int = 0

    def update(self, request_ids: list[str], member: np.ndarray, scores: dict[str, np.ndarray]) -> None:
        for i, rid in enumerate(request_ids):
            is_member = bool(member[i])
            if is_member:
                self.n_member_total += 1
            else:
                self.n_nonmember_total += 1
            h = _hash_rank(rid)
            if h < self.threshold:
                self.rows.append((h, is_member, float(scores["loss"][i]), float(scores["confidence"][i]), float(scores["mentropy"][i])))
        self._shrink()

    def _shrink(self) -> None:
        while len(self.rows) > MAX_EXACT:
            self.threshold //= 2
            self.rows = [r for r in self.rows if r[0] < self.threshold]

    def merge(self, other: MembershipState) -> None:
        self.threshold = min(self.threshold, other.threshold)
        self.rows = [r for r in self.rows + other.rows if r[0] < self.threshold]
        self.n_member_total += other.n_member_total
        self.n_nonmember_total += other.n_nonmember_total
        self._shrink()

    def result(self) -> dict[str, Any] | None:
        rows = sorted(self.rows)
        member = np.array([r[1] for r in rows], dtype=bool)
        n1, n0 = int(member.sum()), int((~member).sum())
        base: dict[str, Any] = {"n_member": self.n_member_total, "n_nonmember": self.n_nonmember_total,
                                "exact": self.threshold == 2**64}
        if n1 == 0 or n0 == 0:
            return None if not rows else {**base, **{k: None for k in ("auc", "advantage", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr")}}
        columns = {name: np.array([r[2 + j] for r in rows]) for j, name in enumerate(ATTACKS)}
        loss = attack_result(columns["loss"][member], columns["loss"][~member])
        out = {**base, **loss}
        for name in ("confidence", "mentropy"):
            scores = columns[name]
            # Null for generative students: only the loss attack applies to a sequence's log-probabilities.
            out[name] = None if np.isnan(scores).all() else attack_result(scores[member], scores[~member])
        return out

    def to_dict(self) -> dict[str, Any]:
        rows = sorted(self.rows)
        return {"threshold": str(self.threshold), "n_member_total": self.n_member_total,
                "n_nonmember_total": self.n_nonmember_total,
                "rows": [[str(h), m, a, _json(b), _json(c)] for h, m, a, b, c in rows]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MembershipState:
        return cls([(int(h), bool(m), a, _nan(b), _nan(c)) for h, m, a, b, c in data["rows"]], int(data["threshold"]),
                   data["n_member_total"], data["n_nonmember_total"])


def _json(score: float) -> float | None:
    """NaN (an attack that does not apply: generative audit records) is stored as null."""
    return None if math.isnan(score) else score


def _nan(score: float | None) -> float:
    return math.nan if score is None else score
