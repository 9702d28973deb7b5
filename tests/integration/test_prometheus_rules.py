"""deploy/prometheus: the committed rules are the generated ones, and promtool checks and unit-tests them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus"


@pytest.mark.parametrize(("args", "committed"), [(["--slo", "examples/slo.yaml"], "rules.yml"), (["--self"], "self.rules.yml")])
def test_the_committed_rules_are_what_kdwatch_generates(args: list[str], committed: str) -> None:
    generated = subprocess.run([sys.executable, "-m", "kdwatch.cli", "prometheus-rules", *args],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert generated == (RULES / committed).read_text(), f"regenerate: kdwatch prometheus-rules {' '.join(args)} > {committed}"


@pytest.mark.parametrize(("rules", "tests"), [("rules.yml", "rules.test.yml"), ("self.rules.yml", "self.rules.test.yml")])
def test_promtool_checks_and_unit_tests_the_rules(rules: str, tests: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None, "installed by `make setup` (Debian package prometheus)"
    check = subprocess.run([promtool, "check", "rules", rules], cwd=RULES, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([promtool, "test", "rules", tests], cwd=RULES, capture_output=True, text=True)
    assert test.returncode == 0 and "SUCCESS" in test.stdout, test.stdout + test.stderr


def test_prometheus_loads_both_rule_files_and_every_self_alert_is_documented() -> None:
    import yaml

    config = yaml.safe_load((RULES / "prometheus.yml").read_text())
    assert config["rule_files"] == ["rules.yml", "self.rules.yml"]
    readme = (ROOT / "README.md").read_text()
    alerts = [r["alert"] for g in yaml.safe_load((RULES / "self.rules.yml").read_text())["groups"] for r in g["rules"]]
    assert len(alerts) == 8 and all(f"`{name}`" in readme for name in alerts)
    for group in yaml.safe_load((RULES / "self.rules.yml").read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["tier"] == "self" and rule["labels"]["severity"] in ("page", "ticket")
            assert rule["annotations"]["runbook"] and rule["annotations"]["description"]
