"""The HTML report renders its charts in a real headless Chromium, with no network."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from matplotlib.image import imread
from prometheus_client import CollectorRegistry

from kdwatch.api import ApiSettings, create_app
from kdwatch.collector.offline import analyze_files, load_reference
from kdwatch.collector.records import Changes
from kdwatch.generator import TrafficSpec, generate
from kdwatch.storage.sql import SqlStore
from tests.integration.helpers import write_jsonl

KEY = "r" * 32
ROOT = Path(__file__).resolve().parents[2]


def test_the_report_renders_every_chart_in_headless_chromium(store: SqlStore, tmp_path: Path) -> None:
    records = list(generate(TrafficSpec(events_per_second=5, audit_rate=0.2, teacher_rate=0.3), 6_000))
    paths = write_jsonl(records, tmp_path / "events")
    refs = load_reference(write_jsonl(list(generate(TrafficSpec(seed=9), 2_000)), tmp_path / "ref")["prediction"])
    windows, _ = analyze_files(paths["prediction"], paths["teacher"], paths["label"], references=refs)
    store.put_reference("fraud-distil", refs["fraud-distil"])
    store.commit_batch("g", 0, 60_000, Changes(closed=windows), {})

    with TestClient(create_app(store, ApiSettings(api_key=KEY), CollectorRegistry())) as client:
        client.put("/v1/slos/agreement", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "fraud-distil", "objective": 0.999, "sli": {"events": {"metric": "agreement"}}})
        response = client.get("/v1/models/fraud-distil/report")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = tmp_path / "report.html"
    page.write_text(response.text)
    # Self-contained: nothing to fetch (XML namespace names are identifiers, not fetched).
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', response.text) and "<script" not in response.text
    assert "@import" not in response.text and not re.search(r"url\((?!#)", response.text)  # only in-page references

    chromium = shutil.which("chromium")
    assert chromium is not None, "installed by `make setup` (Debian package chromium)"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    for figure in ("fidelity", "reliability", "psi", "roc", "budget"):
        start = dom.index(f'<figure id="{figure}">')
        assert "<svg" in dom[start:start + 400] and "<path" in dom[start:dom.index("</figure>", start)], figure
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1400,2600", page.as_uri()], capture_output=True,
                   timeout=120, check=True)
    pixels = imread(shot)[..., :3]
    inked = float(np.mean(pixels.mean(axis=2) < 0.9))
    assert inked > 0.03, f"only {inked:.1%} of the page is drawn"
    (ROOT / ".kdwatch").mkdir(exist_ok=True)
    shutil.copy(shot, ROOT / ".kdwatch" / "report-screenshot.png")  # for people to look at
