"""`kdwatch analyze` output and start-up configuration errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from kdwatch.durations import format_duration_ms, parse_duration_ms
from kdwatch.errors import ConfigError
from kdwatch.generator import TrafficSpec, generate
from kdwatch.settings import load_settings


def test_analyze_prints_one_ordered_window_per_line_with_rfc3339_bounds(tmp_path: Path) -> None:
    files = {k: (tmp_path / f"{k}.jsonl").open("wb") for k in ("prediction", "teacher", "label")}
    for kind, _rid, value in generate(TrafficSpec(events_per_second=10), 1_500):
        files[kind].write(value + b"\n")
    for f in files.values():
        f.close()
    out = subprocess.run(
        [sys.executable, "-m", "kdwatch.cli", "analyze", "--predictions", str(tmp_path / "prediction.jsonl"),
         "--teacher", str(tmp_path / "teacher.jsonl"), "--labels", str(tmp_path / "label.jsonl"), "--window", "1m"],
        capture_output=True, check=True, text=True)
    rows = [orjson.loads(line) for line in out.stdout.splitlines()]
    assert sum(r["n"] for r in rows) == 1_500
    starts = [r["window_start"] for r in rows]
    assert starts == sorted(starts) and len(set(starts)) == len(rows)
    assert rows[0]["window_start"] == "2026-11-18T11:06:00Z" and rows[0]["window_end"] == "2026-11-18T11:07:00Z"
    for field in ("model", "student_version", "n", "n_joined", "n_labeled", "agreement", "kl_mean", "ece", "psi", "mia"):
        assert field in rows[0]


def test_convert_then_analyze_parquet_prints_the_jsonl_windows(tmp_path: Path) -> None:
    files = {k: (tmp_path / f"{k}.jsonl").open("wb") for k in ("prediction", "teacher", "label")}
    for kind, _rid, value in generate(TrafficSpec(events_per_second=10, seed=2), 1_200):
        files[kind].write(value + b"\n")
    for f in files.values():
        f.close()
    for kind in ("prediction", "teacher", "label"):
        subprocess.run([sys.executable, "-m", "kdwatch.cli", "convert", str(tmp_path / f"{kind}.jsonl"),
                        str(tmp_path / f"{kind}.parquet"), "--kind", kind], check=True, capture_output=True)

    def analyze(suffix: str) -> str:
        args = [a for kind, option in (("prediction", "--predictions"), ("teacher", "--teacher"), ("label", "--labels"))
                for a in (option, str(tmp_path / f"{kind}.{suffix}"))]
        return subprocess.run([sys.executable, "-m", "kdwatch.cli", "analyze", *args, "--reference",
                               str(tmp_path / f"prediction.{suffix}")], capture_output=True, check=True, text=True).stdout

    jsonl, parquet = analyze("jsonl"), analyze("parquet")
    assert [orjson.loads(line)["n"] for line in parquet.splitlines()] == [orjson.loads(line)["n"] for line in jsonl.splitlines()]
    for a, b in zip(jsonl.splitlines(), parquet.splitlines(), strict=True):
        ra, rb = orjson.loads(a), orjson.loads(b)
        assert ra["window_start"] == rb["window_start"] and ra["n_joined"] == rb["n_joined"]
        assert ra["agreement"] == rb["agreement"] and ra["psi"].keys() == rb["psi"].keys()
        assert abs(ra["kl_mean"] - rb["kl_mean"]) <= 1e-9 * abs(ra["kl_mean"])


def test_analyze_refuses_a_parquet_column_the_contract_lacks(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"request_id": ["a"], "colour": ["red"]}), tmp_path / "p.parquet")
    out = subprocess.run([sys.executable, "-m", "kdwatch.cli", "analyze", "--predictions", str(tmp_path / "p.parquet")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "'colour' is not a field of the prediction contract" in out.stderr


def test_analyze_rejects_a_bad_window_naming_the_option(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text("")
    out = subprocess.run([sys.executable, "-m", "kdwatch.cli", "analyze", "--predictions", str(tmp_path / "p.jsonl"),
                          "--window", "soon"], capture_output=True, text=True)
    assert out.returncode == 2 and "--window" in out.stderr


@pytest.mark.parametrize(("variable", "value"), [("KDWATCH_WINDOW", "fortnight"), ("KDWATCH_MAX_POLL_RECORDS", "0"),
                                                 ("KDWATCH_KAFKA_SECURITY_PROTOCOL", "TLS")])
def test_a_bad_setting_fails_naming_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert info.value.field == variable


def test_secrets_are_not_shown_by_the_settings() -> None:
    settings = load_settings(database_url="postgresql+psycopg://u:hunter2@db/k", kafka_sasl_password="s3cret")
    assert "hunter2" not in repr(settings) and "s3cret" not in repr(settings)
    assert settings.kafka_options()["sasl_plain_password"] == "s3cret"


@pytest.mark.parametrize(("text", "ms"), [("500ms", 500), ("30s", 30_000), ("1m", 60_000), ("6h", 21_600_000), ("30d", 2_592_000_000)])
def test_durations(text: str, ms: int) -> None:
    assert parse_duration_ms(text) == ms
    assert parse_duration_ms(format_duration_ms(ms)) == ms


def test_analyze_with_slo_prints_the_notifications_it_would_have_sent_after_the_windows(tmp_path: Path) -> None:
    predictions, teacher = (tmp_path / "p.jsonl").open("wb"), (tmp_path / "t.jsonl").open("wb")
    # ~90 % agreement against a 99 % objective: a fast burn that must page.
    spec = TrafficSpec(events_per_second=20, teacher_rate=0.5, label_rate=0.0, disagreement=0.1)
    for kind, _rid, value in generate(spec, 4 * 60 * 20):
        (predictions if kind == "prediction" else teacher).write(value + b"\n")
    predictions.close()
    teacher.close()
    slo = tmp_path / "slo.yaml"
    slo.write_text("slos:\n  - {name: agreement, model: fraud-distil, objective: 0.99, sli: {events: {metric: agreement}}}\n"
                   "retrain:\n  - {model: fraud-distil, when: [{slo: agreement}]}\n")
    out = subprocess.run([sys.executable, "-m", "kdwatch.cli", "analyze", "--predictions", str(tmp_path / "p.jsonl"),
                          "--teacher", str(tmp_path / "t.jsonl"), "--slo", str(slo)], capture_output=True, check=True, text=True)
    rows = [orjson.loads(line) for line in out.stdout.splitlines()]
    kinds = ["window" if "window_start" in r else r["type"] for r in rows]
    assert kinds.index("alert") > max(i for i, k in enumerate(kinds) if k == "window")
    notes = [r for r in rows if "type" in r]
    assert [n["at"] for n in notes] == sorted(n["at"] for n in notes)
    page = next(n for n in notes if n["type"] == "alert" and n["severity"] == "page")
    assert set(page) == {"type", "status", "slo", "severity", "tier", "model", "fingerprint", "at", "burn_long", "burn_short"}
    assert page["status"] == "firing" and page["burn_long"] > 6
    retrain = [n for n in notes if n["type"] == "retrain"]
    assert len(retrain) == 1 and set(retrain[0]) == {"type", "model", "at", "reason", "webhook_id"}


def test_analyze_with_a_bad_slo_file_fails_naming_the_field(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text("")
    slo = tmp_path / "slo.yaml"
    slo.write_text("slos:\n  - {name: a, model: m, objective: 2, sli: {events: {metric: agreement}}}\n")
    out = subprocess.run([sys.executable, "-m", "kdwatch.cli", "analyze", "--predictions", str(tmp_path / "p.jsonl"),
                          "--slo", str(slo)], capture_output=True, text=True)
    assert out.returncode == 2 and "slos[0].objective" in out.stderr
