"""deploy/: no container engine runs here, so keep the manifests honest against the real CLI and settings."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import typer
import yaml

from kdwatch.cli import app
from kdwatch.settings import Settings

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
CLI = typer.main.get_command(app)


def check_command(args: list[str]) -> None:
    """``args`` (after the ``kdwatch`` entry point) name a real command and only its real options."""
    command: Any = CLI
    rest = list(args)
    while hasattr(command, "commands"):  # a group (typer may carry its own click)
        assert rest, f"{args}: a subcommand is needed"
        name = rest.pop(0)
        assert name in command.commands, f"{args}: kdwatch has no command {name!r}"
        command = command.commands[name]
    options = {opt for param in command.params for opt in param.opts}
    for arg in rest:
        if arg.startswith("--"):
            assert arg.split("=")[0] in options, f"{args}: {command.name} has no option {arg}"


def check_environment(env: dict[str, Any]) -> None:
    for key in env:
        if key.startswith("KDWATCH_"):
            assert key[len("KDWATCH_"):].lower() in Settings.model_fields, f"{key} is not a kdwatch setting"


def test_compose_services_run_real_commands_with_real_settings() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    ours = {name: s for name, s in compose["services"].items() if "build" in s}
    assert {"collector-1", "collector-2", "engine", "kdwatch-api", "runner"} <= set(ours)
    for name, service in ours.items():
        check_command(service["command"])
        check_environment(service["environment"])
        assert service["build"]["dockerfile"] == "deploy/Dockerfile", name
    assert ours["collector-1"]["environment"]["KDWATCH_GROUP_ID"] == ours["collector-2"]["environment"]["KDWATCH_GROUP_ID"]
    api = ours["kdwatch-api"]
    port = api["command"][api["command"].index("--port") + 1]
    assert api["ports"] == [f"{port}:{port}"]
    # The engine's retrain webhooks reach the runner's port, signed with the secret the runner verifies.
    runner, engine = ours["runner"], ours["engine"]
    runner_port = runner["command"][runner["command"].index("--port") + 1]
    assert engine["environment"]["KDWATCH_RETRAIN_WEBHOOK_URL"] == f"http://runner:{runner_port}/webhooks/retrain"
    assert runner["environment"]["KDWATCH_RUNNER_WEBHOOK_SECRET"] == engine["environment"]["KDWATCH_RETRAIN_WEBHOOK_SECRET"]
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job["static_configs"][0]["targets"] for job in scrape["scrape_configs"]}
    assert jobs["kdwatch"] == [f"kdwatch-api:{port}"]
    assert jobs["kdwatch-runner"] == [f"runner:{runner_port}"]
    # Each collector and the engine serve their own metrics where Prometheus looks for them.
    for job, services in (("kdwatch-collector", ("collector-1", "collector-2")), ("kdwatch-engine", ("engine",))):
        for service in services:
            command = ours[service]["command"]
            assert f"{service}:{command[command.index('--metrics-port') + 1]}" in jobs[job], (job, service)


def test_kubernetes_manifests_match_the_cli_and_settings() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "kdwatch.yaml").read_text()))
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("ConfigMap", "kdwatch"), ("Secret", "kdwatch"), ("Deployment", "kdwatch-collector"),
            ("Deployment", "kdwatch-api"), ("Service", "kdwatch-api"), ("Deployment", "kdwatch-runner"),
            ("Service", "kdwatch-runner")} <= kinds
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    secret = next(d for d in docs if d["kind"] == "Secret")
    check_environment(config["data"])
    check_environment(secret["stringData"])
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            check_command(container["args"])
            check_environment({e["name"]: e["value"] for e in container.get("env", [])})
            if "--port" in container["args"]:
                port = int(container["args"][container["args"].index("--port") + 1])
                assert [p["containerPort"] for p in container["ports"]] == [port]
    runner_service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "kdwatch-runner")
    assert config["data"]["KDWATCH_RETRAIN_WEBHOOK_URL"] == \
        f"http://kdwatch-runner:{runner_service['spec']['ports'][0]['port']}/webhooks/retrain"
    assert secret["stringData"]["KDWATCH_RUNNER_WEBHOOK_SECRET"] == secret["stringData"]["KDWATCH_RETRAIN_WEBHOOK_SECRET"]


def test_the_dockerfile_runs_the_kdwatch_entry_point() -> None:
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    entry = next(line for line in lines if line.startswith("ENTRYPOINT"))
    cmd = next(line for line in lines if line.startswith("CMD"))
    assert yaml.safe_load(entry.split(" ", 1)[1]) == ["kdwatch"]
    check_command(yaml.safe_load(cmd.split(" ", 1)[1]))
    for package in ("kdwatch", "collector", "analyzer", "slo", "storage", "runner"):
        assert f"COPY {package} {package}" in lines


def test_prometheus_and_alertmanager_accept_their_configs() -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None, "installed by `make setup` (Debian package prometheus)"
    result = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=DEPLOY / "prometheus",
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    amtool = shutil.which("amtool")
    assert amtool is not None, "installed by `make setup` (Debian package prometheus-alertmanager)"
    result = subprocess.run([amtool, "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
