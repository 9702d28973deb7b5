"""The built wheel installs one import package, `kdwatch`, and works from a clean virtualenv.

The wheel is built from this checkout and installed (with its dependencies from PyPI, or pip's
cache) into a new virtualenv; every command runs from a directory outside the repository, so nothing
of the checkout can leak onto the import path.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DESIGN_FOLDERS = ("collector", "analyzer", "slo", "storage", "runner")


def _run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(virtualenv, wheel): the wheel built from this checkout, installed in a fresh virtualenv."""
    base = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources. Symlinks stay links.
    source = base / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "__pycache__", ".kdwatch", ".data", "*.db*", ".*_cache", ".hypothesis"))
    built = _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", base / "dist", source, cwd=base)
    assert built.returncode == 0, built.stderr
    (wheel,) = (base / "dist").glob("kdwatch-*.whl")
    env = base / "venv"
    venv.create(env, with_pip=True)
    pip = _run(env / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel, cwd=base)
    assert pip.returncode == 0, pip.stderr
    return env, wheel


def test_the_wheel_holds_one_top_level_package_with_the_design_folders_inside(installed: tuple[Path, Path]) -> None:
    env, wheel = installed
    shown = _run(env / "bin" / "python", "-m", "pip", "show", "-f", "kdwatch", cwd=wheel.parent)
    assert shown.returncode == 0, shown.stderr
    files = [line.strip() for line in shown.stdout.split("Files:", 1)[1].splitlines() if line.strip()]
    top = {f.split("/", 1)[0] for f in files if not f.startswith("../")}
    assert {t for t in top if not t.endswith(".dist-info")} == {"kdwatch"}, top
    for folder in DESIGN_FOLDERS:
        assert f"kdwatch/{folder}/__init__.py" in files
    assert "kdwatch/py.typed" in files
    assert any(f.startswith("kdwatch/storage/migrations/versions/") for f in files)


def test_the_installed_cli_analyzes_generated_traffic_from_outside_the_repository(installed: tuple[Path, Path], tmp_path: Path) -> None:
    env, _ = installed
    kdwatch = env / "bin" / "kdwatch"
    helped = _run(kdwatch, "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "analyze" in helped.stdout, helped.stderr
    generated = _run(kdwatch, "generate", "--out", tmp_path / "traffic", "--n", "600", cwd=tmp_path)
    assert generated.returncode == 0, generated.stderr
    traffic = tmp_path / "traffic"
    analyzed = _run(kdwatch, "analyze", "--predictions", traffic / "predictions.jsonl", "--teacher", traffic / "teacher.jsonl",
                    "--labels", traffic / "labels.jsonl", "--window", "1m", cwd=tmp_path)
    assert analyzed.returncode == 0, analyzed.stderr
    windows = [json.loads(line) for line in analyzed.stdout.splitlines() if line.startswith("{")]
    assert windows and sum(w["n"] for w in windows) == 600


def test_the_sdk_imports_as_kdwatch_producer_and_the_bare_folder_names_do_not(installed: tuple[Path, Path], tmp_path: Path) -> None:
    env, _ = installed
    python = env / "bin" / "python"
    probe = "from kdwatch.producer import PredictionLogger; import kdwatch.collector.contract as c; print(c.__file__)"
    sdk = _run(python, "-c", probe, cwd=tmp_path)
    assert sdk.returncode == 0, sdk.stderr
    assert str(ROOT) not in sdk.stdout and "site-packages" in sdk.stdout
    for folder in DESIGN_FOLDERS:
        bare = _run(python, "-c", f"import {folder}", cwd=tmp_path)
        assert bare.returncode != 0 and "ModuleNotFoundError" in bare.stderr, (folder, bare.stderr)
