"""The closed loop, shortened: shift, page, one signed retrain, a promoted student, recovered agreement."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from kdwatch.demo import DemoOptions, closed_loop


def test_the_closed_loop_pages_retrains_once_and_recovers(kafka: str, tmp_path: Path) -> None:
    out = io.StringIO()
    options = DemoOptions(clean_minutes=30, total_minutes=90, per_minute=60, audits=50)
    outcome = closed_loop(tmp_path, kafka, options, Console(file=out, width=120))

    assert outcome.pages(), out.getvalue()
    assert [n["type"] for n in outcome.notifications].count("retrain") == 1
    assert [(j["status"], j["student_version"]) for j in outcome.jobs] == [("promoted", "s1-kd1")], out.getvalue()
    clean, shift, retrained = (outcome.phase(name) for name in ("clean", "shift", "retrained"))
    assert clean["agreement"] > 0.95 and shift["agreement"] < 0.6
    assert retrained["student_version"] == "s1-kd1"
    assert retrained["agreement"] > 0.9, out.getvalue()
    assert shift["psi_max"] > 0.25 > clean["psi_max"]  # PSI shows the shift on the pixels
    assert clean["mia_auc"] is not None  # the audit replays reached the windows
    assert outcome.report is not None and outcome.report.read_text().count("<svg") >= 5
    assert "traffic switches to student s1-kd1" in out.getvalue()


def test_the_generative_demo_pages_on_the_prompt_shift_and_sends_the_retrain_webhook(kafka: str, tmp_path: Path) -> None:
    from kdwatch.demo_generative import GenerativeOptions, story

    out = io.StringIO()
    options = GenerativeOptions(clean_minutes=30, total_minutes=60, per_minute=30, teacher_steps=300, student_steps=200)
    clean, shifted = story(tmp_path / "run", kafka, options, Console(file=out, width=140))

    assert clean["pages"] == "-" and "token-agreement" in shifted["pages"], out.getvalue()
    assert shifted["retrain webhooks"] == 1 and "retrain job" in out.getvalue()
    assert shifted["token_agreement"] < clean["token_agreement"] - 0.1
    assert shifted["teacher_ppl"] > 2 * clean["teacher_ppl"]
    assert shifted["kl_rev_mean"] > clean["kl_rev_mean"]
    assert clean["n"] == shifted["n"] == 900 and clean["n_joined"] > 300 and clean["len_mean"] == 16.0
