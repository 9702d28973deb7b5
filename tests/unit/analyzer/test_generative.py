"""Generative students: every window field against a plain numpy computation of its definition, exact merges,
the contract's rules for `generation`, and the join's rejections."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import orjson
import pytest

from kdwatch.analyzer.generative import GenerativeState
from kdwatch.analyzer.window import WindowState
from kdwatch.collector.contract import Generation, decode_prediction, decode_teacher
from kdwatch.collector.records import entry_from_dict, entry_to_dict
from kdwatch.errors import ContractError
from tests.record_joiner.join import PartitionJoiner

TS = 1_795_000_000_000


def pairs(seed: int, n: int) -> tuple[list[Generation], list[Generation]]:
    rng = np.random.default_rng(seed)
    students, teachers = [], []
    for _ in range(n):
        length = int(rng.integers(1, 90))
        tokens = rng.integers(0, 50, length)
        s = -rng.exponential(0.7, length)
        p = np.minimum(s + rng.normal(0, 2.0, length), 0.0)
        if rng.random() < 0.05:
            p[0] = -80.0  # a token the teacher finds very unlikely: d = p - s is clipped at -50 in k3
        top1 = np.where(rng.random(length) < 0.2, rng.integers(0, 50, length), tokens)
        students.append(Generation(s, tokens=tokens))
        teachers.append(Generation(p, top1=top1))
    return students, teachers


def test_every_field_matches_its_definition_in_numpy() -> None:
    students, teachers = pairs(1, 300)
    state = GenerativeState()
    state.add_pairs(students, teachers)
    state.add_lengths([g.length for g in students] + [5, 7])  # two predictions without a replay
    result = state.result()

    s = np.concatenate([g.logprobs for g in students])
    p = np.concatenate([g.logprobs for g in teachers])
    a = np.concatenate([g.tokens for g in students]) == np.concatenate([g.top1 for g in teachers])
    n = s.size
    c = np.clip(p - s, -50, 50)
    seq_agree = np.mean([np.array_equal(st.tokens, te.top1) for st, te in zip(students, teachers, strict=True)])
    z = 1.959963984540054
    phat = a.mean()
    centre = (phat + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    expected = {
        "n_tokens": n, "token_agreement": phat, "token_agreement_ci": [centre - half, centre + half],
        "seq_agreement": seq_agree, "teacher_nll_mean": -p.mean(), "teacher_ppl": math.exp(-p.mean()),
        "student_nll_mean": -s.mean(), "kl_rev_mean": (s - p).mean(), "kl_rev_k3_mean": (np.exp(c) - 1 - c).mean(),
        "len_mean": (sum(g.length for g in students) + 12) / (len(students) + 2),
    }
    assert set(result) == set(expected)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    assert result["kl_rev_k3_mean"] >= 0
    assert seq_agree > 0  # short sequences agree at every position: the count is exercised


def test_states_merge_exactly_in_any_order() -> None:
    students, teachers = pairs(2, 200)
    whole = GenerativeState()
    whole.add_pairs(students, teachers)
    order = list(range(200))
    random.Random(3).shuffle(order)
    merged = GenerativeState()
    for chunk in (order[:50], order[50:130], order[130:]):
        part = GenerativeState()
        part.add_pairs([students[i] for i in chunk], [teachers[i] for i in chunk])
        merged.merge(GenerativeState.from_dict(orjson.loads(orjson.dumps(part.to_dict()))))
    assert merged.to_dict() == whole.to_dict()
    assert merged.result() == whole.result()


def test_a_window_of_a_classifier_reports_the_generative_fields_as_null() -> None:
    result = WindowState(n=3).result()
    assert result["n_tokens"] is None and result["token_agreement"] is None and result["len_mean"] is None


def _prediction(**changes: object) -> bytes:
    base = {"request_id": "r1", "model": "lm", "student_version": "s1", "ts": TS,
            "generation": {"tokens": [5, 6, 7], "logprobs": [-0.1, -2.0, -0.3]}}
    return orjson.dumps({**base, **changes})


@pytest.mark.parametrize(("value", "reason"), [
    (_prediction(probs=[0.5, 0.5]), "probs_or_logits"),
    (_prediction(generation={"tokens": [1, 2], "logprobs": [-0.1]}), "bad_generation"),
    (_prediction(generation={"tokens": [], "logprobs": []}), "bad_generation"),
    (_prediction(generation={"tokens": [1], "logprobs": [0.2]}), "bad_generation"),
    (_prediction(generation={"tokens": [-1], "logprobs": [-0.2]}), "wrong_type"),
    (_prediction(generation={"tokens": [1.5], "logprobs": [-0.2]}), "wrong_type"),
    (_prediction(generation={"tokens": [1], "logprobs": ["x"]}), "wrong_type"),
    (_prediction(generation={"tokens": [1], "logprobs": [-0.2], "top1": [1]}), "bad_generation"),
    (_prediction(generation={"tokens": [1] * 4097, "logprobs": [-0.2] * 4097}), "bad_generation"),
    (_prediction(generation=[1, 2]), "bad_generation"),
    (_prediction(label=1), "generative_mismatch"),
])
def test_the_contract_rejects_a_bad_generation_with_its_reason(value: bytes, reason: str) -> None:
    with pytest.raises(ContractError) as caught:
        decode_prediction(value)
    assert caught.value.reason == reason


def test_a_generative_audit_record_needs_no_label_and_a_replay_carries_top1() -> None:
    audit = decode_prediction(_prediction(audit="member"))
    assert audit.generation is not None and audit.dist is None and audit.label is None
    replay = decode_teacher(orjson.dumps({"request_id": "r1", "model": "lm", "teacher_version": "t", "ts": TS,
                                          "generation": {"logprobs": [-0.2, -0.1, -0.4], "top1": [5, 9, 7]}}))
    assert replay.generation is not None and replay.generation.top1 is not None and replay.generation.top1.tolist() == [5, 9, 7]
    with pytest.raises(ContractError, match="top1"):
        decode_teacher(_prediction().replace(b'"student_version":"s1"', b'"teacher_version":"t"'))


def test_the_join_rejects_length_mismatches_mixed_kinds_and_labels_of_generative_predictions() -> None:
    joiner = PartitionJoiner(60_000, 600_000)
    joiner.add_prediction(decode_prediction(_prediction()))
    joiner.add_teacher(decode_teacher(orjson.dumps({"request_id": "r1", "model": "lm", "teacher_version": "t", "ts": TS,
                                                    "generation": {"logprobs": [-0.2, -0.1], "top1": [5, 9]}})))
    joiner.add_teacher(decode_teacher(orjson.dumps({"request_id": "r1", "model": "lm", "teacher_version": "t", "ts": TS,
                                                    "probs": [0.5, 0.5]})))
    joiner.add_prediction(decode_prediction(orjson.dumps({"request_id": "r2", "model": "lm", "student_version": "s1",
                                                          "ts": TS + 5, "probs": [0.5, 0.5]})))
    changes = joiner.end_batch()
    assert changes.counters[("teacher", "generation_length_mismatch")] == 1
    assert changes.counters[("teacher", "generative_mismatch")] == 1
    assert changes.counters[("prediction", "generative_mismatch")] == 1
    state = next(iter(changes.windows.values()))
    assert state.n == 1 and state.generative.n_seq == 0 and state.n_rejected == 1  # the rejected prediction
    # A generative buffer entry survives the storage codec.
    entry = joiner.entries[("p", "lm", "r1")]
    again = entry_from_dict("p", "lm", "r1", orjson.loads(orjson.dumps(entry_to_dict(entry))))
    assert again.gen is not None and again.gen.tokens is not None and again.gen.tokens.tolist() == [5, 6, 7]
    assert again.gen.logprobs.tolist() == [-0.1, -2.0, -0.3]


def test_jsonl_and_parquet_give_the_same_generative_windows(tmp_path: Path) -> None:
    from kdwatch.collector.offline import analyze_files, load_reference
    from kdwatch.collector.parquet_io import convert_jsonl
    from kdwatch.generator import GenerativeSpec, generate_generative

    files: dict[str, dict[str, Path]] = {}
    for name, spec, n in (("events", GenerativeSpec(seed=5, audit_rate=0.1, teacher_rate=0.5), 1_200),
                          ("ref", GenerativeSpec(seed=6), 600)):
        (tmp_path / name).mkdir()
        lines: dict[str, list[bytes]] = {"prediction": [], "teacher": [], "label": []}
        for kind, _rid, value in generate_generative(spec, n):
            lines[kind].append(value)
        files[name] = {}
        for kind, values in lines.items():
            if values:
                path = tmp_path / name / f"{kind}.jsonl"
                path.write_bytes(b"\n".join(values) + b"\n")
                convert_jsonl(path, path.with_suffix(".parquet"), kind)
                files[name][kind] = path
    reference = files["ref"]["prediction"]
    refs, refs_pq = load_reference(reference), load_reference(reference.with_suffix(".parquet"))
    assert {m: r.to_dict() for m, r in refs.items()} == {m: r.to_dict() for m, r in refs_pq.items()}
    assert {"_length", "_mean_logprob", "prompt_tokens", "channel"} <= set(refs["support-chat"].features)
    events = files["events"]
    w1, c1 = analyze_files(events["prediction"], events["teacher"], references=refs)
    w2, c2 = analyze_files(events["prediction"].with_suffix(".parquet"), events["teacher"].with_suffix(".parquet"),
                           references=refs_pq)
    assert c1 == c2 and {k: s.to_dict() for k, s in w1.items()} == {k: s.to_dict() for k, s in w2.items()}
    assert sum(s.generative.n_seq for s in w1.values()) > 500


def test_the_report_shows_a_generative_students_token_level_fields() -> None:
    from kdwatch.analyzer.rollup import Bucket
    from kdwatch.report import ReportData, render

    buckets = []
    for i, version in enumerate(["s1", "s1", "s2"]):
        students, teachers = pairs(10 + i, 40)
        state = WindowState(n=40)
        state.add_generations(students, teachers)
        state.generative.add_lengths([g.length for g in students])
        buckets.append(Bucket("lm", version, TS + i * 60_000, state, True, 1))
    page = render(ReportData("lm", "1m", buckets, None))
    for card in ("n_tokens", "token_agreement", "teacher_ppl", "kl_rev_mean"):
        assert f"<span>{card}</span>" in page
    assert "<span>ece</span>" not in page and page.count("<svg") >= 4


def test_the_generative_slis_alert_in_the_backtest(tmp_path: Path) -> None:
    """`kdwatch analyze --slo` on a language-model student whose agreement with its teacher drops after an hour:
    the token-agreement and reverse-KL events SLIs and the perplexity timeslices page; a healthy hour pages nothing."""
    import subprocess
    import sys

    from kdwatch.generator import GenerativeSpec, generate_generative

    hour = 3_600 * 5  # predictions of an hour at 5 a second
    healthy = GenerativeSpec(seed=1, events_per_second=5, mean_length=24, teacher_rate=0.5, disagreement=0.02)
    shifted = GenerativeSpec(seed=2, events_per_second=5, mean_length=24, teacher_rate=0.5, disagreement=0.5,
                             start_ms=healthy.start_ms + 3_600_000)
    lines: dict[str, list[bytes]] = {"prediction": [], "teacher": []}
    for spec in (healthy, shifted):
        for kind, _rid, value in generate_generative(spec, hour):
            lines[kind].append(value)
    for kind, values in lines.items():
        (tmp_path / f"{kind}.jsonl").write_bytes(b"\n".join(values) + b"\n")
    slo = tmp_path / "slo.yaml"
    slo.write_text(
        "slos:\n"
        "  - {name: tokens, model: support-chat, objective: 0.95, period: 1d, sli: {events: {metric: token_agreement}}}\n"
        "  - {name: kl-rev, model: support-chat, objective: 0.9, period: 1d, sli: {events: {metric: kl_rev, threshold: 0.4}}}\n"
        "  - {name: ppl, model: support-chat, objective: 0.9, period: 1d,"
        " sli: {timeslices: {metric: teacher_ppl, threshold: 3.0, min_samples: 100}}}\n")
    out = subprocess.run([sys.executable, "-m", "kdwatch.cli", "analyze", "--predictions", str(tmp_path / "prediction.jsonl"),
                          "--teacher", str(tmp_path / "teacher.jsonl"), "--slo", str(slo)], capture_output=True, check=True, text=True)
    rows = [orjson.loads(line) for line in out.stdout.splitlines()]
    windows = [r for r in rows if "window_start" in r]
    assert max(w["teacher_ppl"] for w in windows[:55]) < 3.0 < min(w["teacher_ppl"] for w in windows[65:115])
    pages = [r for r in rows if r.get("type") == "alert" and r["severity"] == "page" and r["status"] == "firing"]
    assert {p["slo"] for p in pages} == {"tokens", "kl-rev", "ppl"}, [r for r in rows if "type" in r]
    shift_at = "2026-11-18T12:06:40Z"  # healthy.start_ms + 1 h
    assert all(p["at"] > shift_at for p in pages)
