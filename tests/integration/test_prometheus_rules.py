"""deploy/prometheus: the committed rules are the generated ones, and promtool checks and unit-tests them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus"


def test_the_committed_rules_are_what_kdwatch_generates_from_the_example_slos() -> None:
    generated = subprocess.run([sys.executable, "-m", "kdwatch.cli", "prometheus-rules", "--slo", "examples/slo.yaml"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert generated == (RULES / "rules.yml").read_text(), "regenerate: kdwatch prometheus-rules --slo examples/slo.yaml"


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None, "installed by `make setup` (Debian package prometheus)"
    check = subprocess.run([promtool, "check", "rules", "rules.yml"], cwd=RULES, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([promtool, "test", "rules", "rules.test.yml"], cwd=RULES, capture_output=True, text=True)
    assert test.returncode == 0 and "SUCCESS" in test.stdout, test.stdout + test.stderr
