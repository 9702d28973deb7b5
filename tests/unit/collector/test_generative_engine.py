"""Generative (language-model) students on the columnar engine: the record joiner's windows, counters and reasons.

Random streams mix a generative student, a classifier and a model whose windows receive both kinds,
with every generative rule exercised: replays scoring another number of tokens
(``generation_length_mismatch``), a classifier replay for a generative prediction or a generative one
for a classifier's, labels for generative predictions, windows where both kinds meet
(``generative_mismatch``), generative audit records, invalid generations, duplicates, early, late and
unmatched partners, rows out of order. JSONL and Parquet, several batch sizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from kdwatch.collector.offline import analyze_files
from tests.record_joiner.offline import record_analyze
from tests.unit.collector.test_columnar import (
    START,
    _batch_rows,
    assert_same,
    compare,
    record_reference,
    results,
    to_parquet,
    with_retries,
)

WINDOW_MS, GRACE_MS = 10_000, 20_000


def _generation(rng: np.random.Generator, length: int, teacher: bool, like: list[int] | None = None) -> dict[str, Any]:
    ids = [int(t) if rng.random() < 0.8 else int(rng.integers(0, 50)) for t in like] if like else \
        [int(x) for x in rng.integers(0, 50, length)]
    logprobs = [float(-rng.exponential(1.5)) for _ in range(length)]
    return {"logprobs": logprobs, "top1": ids} if teacher else {"tokens": ids, "logprobs": logprobs}


def _stream(seed: int, n: int, invalid: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Predictions, replays and labels of three models: "gen" (generative), "cls" (classifier), "both" (mixed).

    ``invalid``: with predictions the contract rejects (a Parquet file holds valid rows only).
    """
    rng = np.random.default_rng(seed)
    out: dict[str, list[dict[str, Any]]] = {"prediction": [], "teacher": [], "label": []}
    for i in range(n):
        model = str(rng.choice(["gen", "gen", "cls", "both"]))
        ts = START + i * 150 + int(rng.integers(-3_000, 3_000))  # out of order within a few seconds
        rid = f"{model}-{seed}-{i}"
        generative = model == "gen" or (model == "both" and rng.random() < 0.5)
        pred: dict[str, Any] = {"request_id": rid, "model": model, "student_version": str(rng.choice(["v1", "v2"])),
                                "ts": ts, "latency_ms": float(rng.integers(1, 90)), "segment": str(rng.choice(["a", "b"]))}
        length = int(rng.integers(1, 7))
        if generative:
            pred["generation"] = _generation(rng, length, teacher=False)
            if rng.random() < 0.5:
                pred["prompt_tokens"] = [int(x) for x in rng.integers(0, 50, 3)]
            if rng.random() < 0.02 and invalid:
                pred["generation"]["logprobs"][0] = 0.5  # bad_generation
            if rng.random() < 0.02 and invalid:
                pred["label"] = 1  # generative_mismatch at the contract
        else:
            probs = rng.dirichlet(np.ones(3))
            pred["probs"] = [float(x) for x in probs]
            if rng.random() < 0.2:
                pred["label"] = int(rng.integers(0, 3))
        if rng.random() < 0.5:
            pred["features"] = {"x": float(rng.normal()), "c": str(rng.choice(["p", "q"]))}
        if rng.random() < 0.06:
            pred["audit"] = str(rng.choice(["member", "nonmember"]))
            if not generative:
                pred["label"] = int(rng.integers(0, 3))
        out["prediction"].append(pred)
        # Early, in time, near the grace, late or unmatched
        delay = int(rng.choice([-2_000, 1_000, 5_000, 15_000, 40_000], p=[0.15, 0.45, 0.25, 0.1, 0.05]))
        if rng.random() < 0.7:
            replay: dict[str, Any] = {"request_id": rid, "model": model, "teacher_version": "t1", "ts": ts + delay}
            roll = rng.random()
            if generative and roll < 0.85:
                tokens = pred["generation"]["tokens"]
                replay["generation"] = _generation(rng, len(tokens), True, like=tokens)
            elif generative and roll < 0.93:
                replay["generation"] = _generation(rng, length + 1, True)  # generation_length_mismatch
            elif not generative and roll < 0.93:
                replay["probs"] = [float(x) for x in rng.dirichlet(np.ones(3))]
            elif generative:
                replay["probs"] = [0.5, 0.25, 0.25]  # a classifier replay for a generative prediction
            else:
                replay["generation"] = _generation(rng, 2, True)  # a generative replay for a classifier's
            out["teacher"].append(replay)
        if rng.random() < 0.3:
            out["label"].append({"request_id": rid, "model": model, "label": int(rng.integers(0, 3)), "ts": ts + delay})
    for kind in ("teacher", "label"):  # as a replayer and a labeller write them: in time order
        out[kind].sort(key=lambda row: row["ts"])
    return out


def _write(directory: Path, stream: dict[str, list[dict[str, Any]]]) -> dict[str, Path]:
    paths = {}
    for kind, rows in stream.items():
        paths[kind] = directory / f"{kind}.jsonl"
        paths[kind].write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return paths


@pytest.mark.parametrize(("seed", "batch"), [(1, 65_536), (2, 97), (3, 13), (4, 500)])
def test_generative_streams_give_the_record_joiners_windows_on_the_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                         seed: int, batch: int) -> None:
    _batch_rows(monkeypatch, batch)
    reference = tmp_path / "ref.jsonl"
    reference.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in _stream(seed + 100, 600, invalid=False)["prediction"]
                                   if "audit" not in r))
    refs = record_reference(reference)
    assert "_length" in refs["gen"].features and "_mean_logprob" in refs["gen"].features
    # Valid rows only: JSONL and Parquet against the record joiner.
    (tmp_path / "valid").mkdir()
    paths = _write(tmp_path / "valid", _stream(seed, 3_000, invalid=False))
    with_retries(paths, 0.03, seed)
    windows, counters = compare(paths, to_parquet(paths), None, window_ms=WINDOW_MS, grace_ms=GRACE_MS)
    for kind, reason in [("prediction", "generative_mismatch"), ("teacher", "generative_mismatch"),
                         ("teacher", "generation_length_mismatch"), ("label", "generative_mismatch"),
                         ("prediction", "duplicate"), ("teacher", "unmatched")]:
        assert counters.get((kind, reason), 0) > 0, (kind, reason)
    generative = [w for key, w in windows.items() if key.model == "gen"]
    assert sum(w["n_tokens"] or 0 for w in generative) > 0 and any(w["seq_agreement"] for w in generative)
    assert any(w["n_audit"] for w in generative)
    assert any(w["n_rejected"] for key, w in windows.items() if key.model == "both")
    # With invalid rows and a reference (drift of the generative outputs and the inputs), JSONL.
    paths = _write(tmp_path, _stream(seed, 3_000))
    with_retries(paths, 0.03, seed)
    expected = record_analyze(paths["prediction"], paths["teacher"], paths["label"], window_ms=WINDOW_MS,
                             grace_ms=GRACE_MS, references=refs)
    assert expected[1].get(("prediction", "bad_generation"), 0) > 0
    got = analyze_files(paths["prediction"], paths["teacher"], paths["label"], window_ms=WINDOW_MS,
                        grace_ms=GRACE_MS, references=refs)
    assert got[1] == expected[1]
    assert_same(results(expected[0], refs, WINDOW_MS), results(got[0], refs, WINDOW_MS), "windows")
