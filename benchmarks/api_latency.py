"""API latency under a real load tool: `wrk` against `kdwatch serve` over 30 days of 1-minute windows.

43,200 stored windows of one model (a realistic state: replays, labels, audit records, PSI against
a reference), then: the windows endpoint rolled up to step=1h (720 points merged from state) at 20
concurrent connections, asking for gzip as HTTP clients do and uncompressed, and the HTML report at
2. Medians of the runs' p50 and p99.

    python benchmarks/api_latency.py [--runs 3] [--seconds 10]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import ROOT

sys.path.insert(0, str(ROOT))

from kdwatch.collector.offline import analyze_files, load_reference
from kdwatch.collector.records import Changes, WindowKey
from kdwatch.devkafka import free_port
from kdwatch.generator import TrafficSpec, generate
from kdwatch.storage.sql import SqlStore

DAY_MS = 86_400_000


def seed(db: Path, work: Path) -> None:
    records = list(generate(TrafficSpec(events_per_second=2, audit_rate=0.05, model="m"), 240))
    for kind in ("prediction", "teacher", "label"):
        (work / f"{kind}.jsonl").write_bytes(b"\n".join(v for k, _r, v in records if k == kind) + b"\n")
    ref_lines = b"\n".join(v for k, _r, v in generate(TrafficSpec(model="m", seed=3), 2_000) if k == "prediction")
    (work / "ref.jsonl").write_bytes(ref_lines + b"\n")
    refs = load_reference(work / "ref.jsonl")
    windows, _ = analyze_files(work / "prediction.jsonl", work / "teacher.jsonl", work / "label.jsonl", references=refs)
    state = max(windows.values(), key=lambda s: s.n)
    store = SqlStore.from_url(f"sqlite:///{db}")
    store.migrate()
    store.put_reference("m", refs["m"])
    start = 1_790_000_000_000 - 1_790_000_000_000 % DAY_MS
    for day in range(30):
        changes = Changes()
        for minute in range(1440):
            changes.closed[WindowKey("m", "s1", start + (day * 1440 + minute) * 60_000)] = state
        store.commit_batch("bench", 0, 60_000, changes, {})
    store.close()


def wrk(url: str, connections: int, seconds: int, gzip: bool = False) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, requests/s) from wrk --latency; ``gzip`` sends Accept-Encoding: gzip as HTTP clients do."""
    header = ["-H", "Accept-Encoding: gzip"] if gzip else []
    out = subprocess.run(["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds}s", "--timeout", "60s",
                          "--latency", *header, url], capture_output=True, text=True, check=True).stdout

    def ms(label: str) -> float:
        value, unit = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return ms("50"), ms("99"), rps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed (Debian package wrk; `make bench` installs it)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        db = work / "k.db"
        t0 = time.perf_counter()
        seed(db, work)
        print(f"seeded 43,200 windows in {time.perf_counter() - t0:.1f}s")
        port = free_port()
        server = subprocess.Popen([str(ROOT / ".venv" / "bin" / "kdwatch"), "serve", "--port", str(port),
                                   "--database-url", f"sqlite:///{db}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(timeout=120) as client:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    try:
                        if client.get(base + "/healthz").status_code == 200:
                            break
                    except httpx.HTTPError:
                        time.sleep(0.2)
                windows_url = base + "/v1/models/m/windows?step=1h"
                t1 = time.perf_counter()
                points = len(client.get(windows_url).json()["windows"])
                cold = time.perf_counter() - t1
                t2 = time.perf_counter()
                client.get(base + "/v1/models/m/report")
                report_cold = time.perf_counter() - t2
            results = {"windows step=1h, Accept-Encoding: gzip (20 connections)":
                       [wrk(windows_url, 20, args.seconds, gzip=True) for _ in range(args.runs)],
                       "windows step=1h, uncompressed (20 connections)":
                       [wrk(windows_url, 20, args.seconds) for _ in range(args.runs)],
                       "report (2 connections)": [wrk(base + "/v1/models/m/report", 2, args.seconds) for _ in range(args.runs)]}
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
    print(f"\nwindows endpoint: {points} points; first (uncached) request {cold * 1000:.0f} ms; "
          f"first report {report_cold * 1000:.0f} ms\n")
    print("| endpoint | p50 ms | p99 ms | requests/s |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        p50 = statistics.median(r[0] for r in runs)
        p99 = statistics.median(r[1] for r in runs)
        rps = statistics.median(r[2] for r in runs)
        print(f"| {name} | {p50:.1f} | {p99:.1f} | {rps:.0f} |")


if __name__ == "__main__":
    main()
