"""A closed window's state from its predictions and what joined them, computed on columns at once.

Used by the columnar engine (collector.columnar) when the watermark closes a window; the fields are
those the README defines; tests hold them equal to the record joiner's (tests/record_joiner), which
accumulates them record by record, and to the oracle's (tests/oracle.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kdwatch.analyzer.drift import CONFIDENCE, LENGTH, MEAN_LOGPROB, PREDICTED_CLASS, FeatureBins, Reference
from kdwatch.analyzer.fidelity import STUDENT_PROB_FLOOR
from kdwatch.analyzer.membership import attack_scores
from kdwatch.analyzer.window import WindowState
from kdwatch.collector.column_join import OpenRows
from kdwatch.collector.column_rules import row_classes
from kdwatch.collector.columns import Block, present, to_numpy
from kdwatch.collector.contract import Distribution
from kdwatch.collector.records import NO_SEGMENT, TransferRecord, transfer_rank


def window_state(model: str, rows: OpenRows, reference: Reference | None, fingerprint: str) -> WindowState:
    """One window's state from its predictions and what joined them, all at once.

    Predictions of several class counts (a model whose classes changed): the metrics per class count, as
    analyzer.window groups them, merged; segments counted over all rows in their order.
    """
    p = rows.preds
    assert p.probs is not None
    classes = row_classes(p, np.arange(p.n))
    counts = np.unique(classes)
    if counts.size <= 1:
        narrow = counts.size and int(counts[0]) < p.probs.shape[1]  # its rows of fewer classes than the chunk's widest
        state, columns = _state(model, _narrow(rows, int(counts[0])) if narrow else rows, reference, fingerprint)
    else:
        state, columns = WindowState(), [np.zeros(p.n, dtype=bool) for _ in range(5)]
        for k in counts.tolist():
            idx = np.flatnonzero(classes == k)
            part, cols = _state(model, _narrow(rows.take(idx), k), reference, fingerprint)
            state.merge(part)
            for full, col in zip(columns, cols, strict=True):
                full[idx] = col
    _add_segments(state, p, columns)
    return state


def _narrow(rows: OpenRows, k: int) -> OpenRows:
    """Rows of ``k`` classes with their matrices cut to ``k`` columns."""
    p = rows.preds
    assert p.probs is not None
    preds = replace(p, probs=p.probs[:, :k], logp=None if p.logp is None else p.logp[:, :k])
    return replace(rows, preds=preds, teacher_probs=rows.teacher_probs[:, :k],
                   teacher_logp=None if rows.teacher_logp is None else rows.teacher_logp[:, :k], index=None)


def _state(model: str, rows: OpenRows, reference: Reference | None, fingerprint: str
           ) -> tuple[WindowState, list[np.ndarray]]:
    """The state of rows of one class count, but its segments; and the per-row columns the segments count."""
    p = rows.preds
    assert p.probs is not None and p.label is not None and p.audit is not None
    assert p.latency is not None and p.segment is not None
    if not p.probs.shape[1]:  # a generative student's (no classes)
        return _generative_state(rows, reference, fingerprint)
    state = WindowState()

    def student_log(idx: np.ndarray) -> np.ndarray:
        assert p.probs is not None
        floor = np.log(np.maximum(p.probs[idx], STUDENT_PROB_FLOOR))
        return floor if p.logp is None else np.where(np.isnan(p.logp[idx]), floor, p.logp[idx])

    label = np.where(p.label >= 0, p.label, rows.label_joined)
    audit = p.audit > 0
    prod = ~audit
    s_pred = np.argmax(p.probs, axis=1)
    confidence = np.take_along_axis(p.probs, s_pred[:, None], axis=1)[:, 0]
    state.n = int(prod.sum())
    lat = p.latency[prod]
    lat = lat[~np.isnan(lat)]
    if lat.size:
        state.latency.update(lat)
    if reference is not None and state.n:
        every = bool(prod.all())
        k = p.probs.shape[1]
        _add_drift(state, reference, fingerprint, p, prod, {
            CONFIDENCE: lambda fb: fb.count(confidence if every else confidence[prod]),
            PREDICTED_CLASS: lambda fb: fb.count_classes(s_pred if every else s_pred[prod], k)})
    pair = prod & rows.has_teacher
    agree = np.zeros(p.n, dtype=bool)
    labeled = prod & (label >= 0)
    correct = s_pred == label
    if pair.any():
        idx = np.flatnonzero(pair)
        t = rows.teacher_probs[idx]
        t_log = np.log(np.where(t > 0, t, 1.0))
        if rows.teacher_logp is not None:
            t_log = np.where(np.isnan(rows.teacher_logp[idx]), t_log, rows.teacher_logp[idx])
        state.fidelity.update(t, t_log, p.probs[idx], student_log(idx))
        agree[idx] = np.argmax(t, axis=1) == s_pred[idx]
        for ver, count in Counter(rows.teacher_version[idx].tolist()).items():
            state.teacher_versions[ver] = count
    if labeled.any():
        state.calibration.update(confidence[labeled], correct[labeled])
    lt = labeled & rows.has_teacher
    if lt.any():
        idx = np.flatnonzero(lt)
        t = rows.teacher_probs[idx]
        state.n_labeled_with_teacher = int(idx.size)
        state.n_correct_student_lt = int(correct[idx].sum())
        state.teacher_calibration.update(t.max(axis=1), np.argmax(t, axis=1) == label[idx])
    if audit.any():
        idx = np.flatnonzero(audit)
        state.n_audit = int(idx.size)
        scores = attack_scores(p.probs[idx], student_log(idx), label[idx])
        ids = p.request_id.take(pa.array(idx, type=pa.int64())).to_pylist()
        state.membership.update(ids, p.audit[idx] == 1, scores)
    return state, [prod, pair, pair & agree, labeled, labeled & correct]


def _add_drift(state: WindowState, reference: Reference, fingerprint: str, p: Block, prod: np.ndarray,
               outputs: dict[str, Callable[[FeatureBins], np.ndarray]]) -> None:
    """Bin counts of the production rows' input features and output features (``outputs``: name -> its counts)."""
    drift = state.drift
    drift.fingerprint = fingerprint
    every = bool(prod.all())
    for name, fb in reference.features.items():
        if name in outputs:
            counted = outputs[name](fb)
        elif name in p.features:
            values = p.features[name] if every else p.features[name][prod]
            counted = fb.count(values if values.dtype.kind == "f" else values.tolist())
        else:
            continue
        drift.add_counts(name, counted)


def _generative_state(rows: OpenRows, reference: Reference | None, fingerprint: str) -> tuple[WindowState, list[np.ndarray]]:
    """The state of a generative student's rows (analyzer.generative on their generations), but its segments."""
    p = rows.preds
    assert p.gen is not None and p.audit is not None and p.latency is not None
    state = WindowState()
    audit = p.audit > 0
    prod = ~audit
    state.n = int(prod.sum())
    lat = p.latency[prod]
    lat = lat[~np.isnan(lat)]
    if lat.size:
        state.latency.update(lat)
    gens = p.gen[prod].tolist()
    if reference is not None and state.n:
        lengths = np.array([float(g.length) for g in gens])
        means = np.array([float(g.logprobs.mean()) for g in gens])
        _add_drift(state, reference, fingerprint, p, prod, {LENGTH: lambda fb: fb.count(lengths),
                                                             MEAN_LOGPROB: lambda fb: fb.count(means)})
    state.generative.add_lengths([g.length for g in gens])
    pair = prod & rows.has_teacher
    agree = np.zeros(p.n, dtype=bool)
    if pair.any():
        assert rows.teacher_gen is not None
        idx = np.flatnonzero(pair)
        student, teacher = p.gen[idx].tolist(), rows.teacher_gen[idx].tolist()
        state.add_generations(student, teacher)
        # A segment's agreement for a generative student is its sequence agreement (every token).
        agree[idx] = [np.array_equal(t.top1, s.tokens) for s, t in zip(student, teacher, strict=True)]
        for ver, count in Counter(rows.teacher_version[idx].tolist()).items():
            state.teacher_versions[ver] = count
    if audit.any():
        idx = np.flatnonzero(audit)
        ids = p.request_id.take(pa.array(idx, type=pa.int64())).to_pylist()
        state.add_generative_audit(ids, p.gen[idx].tolist(), (p.audit[idx] == 1).tolist())
    none = np.zeros(p.n, dtype=bool)
    return state, [prod, pair, pair & agree, none, none]


def _add_segments(state: WindowState, p: Block, columns: list[np.ndarray]) -> None:
    """Per-segment counts of production predictions (columns: production, paired, agreeing, labelled, correct)."""
    prod = columns[0]
    assert p.segment is not None
    if not prod.any():
        return
    if p.segment.null_count == p.n:  # no segments: one row of totals
        state.add_segments({NO_SEGMENT: [int(c.sum()) for c in columns]})
        return
    segment = pc.dictionary_encode(pc.fill_null(p.segment.filter(pa.array(prod)), NO_SEGMENT))
    # Names in order of first appearance, as a record-by-record join meets them: past MAX_SEGMENTS names,
    # add_segments counts the later ones under OTHER_SEGMENT, in the same order.
    names = np.asarray(segment.dictionary.to_pylist(), dtype=object)
    inverse = to_numpy(segment.indices)
    counts = np.stack([np.bincount(inverse, weights=c[prod], minlength=names.size) for c in columns], axis=1)
    state.add_segments({str(name): [int(x) for x in row] for name, row in zip(names.tolist(), counts, strict=True)})



def transfer_sample(model: str, rows: OpenRows, keep: int) -> list[TransferRecord]:
    """The ``keep`` lowest-ranked joined predictions of one closed window (the README's rule), as transfer records.

    Candidates are production predictions with a teacher replay and features, ranked by
    records.transfer_rank, so the live and the offline paths keep the same ones.
    """
    p = rows.preds
    assert p.audit is not None and p.probs is not None and p.label is not None
    generative = present(p.gen, p.n)
    # A classifier's with its features; a generative student's with its prompt.
    has_input = np.where(generative, present(p.prompt, p.n), bool(p.features))
    candidates = np.flatnonzero(rows.has_teacher & (p.audit == 0) & has_input)
    if not candidates.size:
        return []
    ids = p.request_id.take(pa.array(candidates, type=pa.int64())).to_pylist()
    ranked = sorted(zip((transfer_rank(model, rid) for rid in ids), ids, candidates.tolist(), strict=True))[:keep]
    versions = p.version.to_pylist()
    out = []
    for _rank, rid, r in ranked:
        if generative[r]:
            assert p.prompt is not None and p.gen is not None and rows.teacher_gen is not None
            out.append(TransferRecord(model, rid, int(p.ts[r]), versions[r], {"prompt_tokens": p.prompt[r]},
                                      rows.teacher_gen[r], p.gen[r], None))
            continue
        k = int(np.count_nonzero(~np.isnan(p.probs[r])))
        student = Distribution(p.probs[r, :k].copy(), None if p.logp is None or np.isnan(p.logp[r, 0]) else p.logp[r, :k].copy())
        t_logp = rows.teacher_logp
        teacher = Distribution(rows.teacher_probs[r, :k].copy(),
                               None if t_logp is None or np.isnan(t_logp[r, 0]) else t_logp[r, :k].copy())
        features = {name: (float(col[r]) if col.dtype.kind == "f" else col[r]) for name, col in p.features.items()
                    if not (col[r] is None or (col.dtype.kind == "f" and np.isnan(col[r])))}
        label = int(p.label[r]) if p.label[r] >= 0 else int(rows.label_joined[r])
        out.append(TransferRecord(model, rid, int(p.ts[r]), versions[r], features, teacher, student,
                                  None if label < 0 else label))
    return out
