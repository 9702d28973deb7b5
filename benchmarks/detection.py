"""Detection: how long after an incident starts the agreement SLO pages, against the SRE workbook's arithmetic.

Agreement is 99.5 % for 6 hours, then 80 % (the incident) for 4 hours; the SLO is 99 % over 30 days
with the workbook's multi-window, multi-burn-rate alerts (page: 14.4 over 1h/5m, 6 over 6h/30m).
Disagreements are spread evenly (not drawn at random), so the error rate of any window is exact and
the theoretical detection time is a formula:

    a tier pages once both its long and short windows average at least burn * (1 - objective);
    with base error e0 before the incident and e1 after, a window of length W (full of data) gets
    there t = W * (burn * budget - e0) / (e1 - e0) after the incident starts.

The measured time runs the SLO engine over the windows `kdwatch analyze --slo` computes (its
backtest), so it includes the 1-minute window granularity.

    python benchmarks/detection.py
"""

from __future__ import annotations

import json
import math
import subprocess
import tempfile
from datetime import datetime
from pathlib import Path

import orjson
from common import ROOT

KDWATCH = str(ROOT / ".venv" / "bin" / "kdwatch")
START_MS = 1_795_000_020_000 - 1_795_000_020_000 % 3_600_000
RATE_PER_S = 2  # predictions per second, every one replayed by the teacher
CLEAN_H, INCIDENT_H = 6, 4
E0, E1, OBJECTIVE = 0.005, 0.20, 0.99
PAGE_TIERS = [("1h/5m", 60.0, 5.0, 14.4), ("6h/30m", 360.0, 30.0, 6.0)]


def write_traffic(folder: Path) -> tuple[Path, Path]:
    predictions, teacher = folder / "predictions.jsonl", folder / "teacher.jsonl"
    step_ms = 1000 // RATE_PER_S
    n_clean = CLEAN_H * 3600 * RATE_PER_S
    n = n_clean + INCIDENT_H * 3600 * RATE_PER_S
    with predictions.open("wb") as p, teacher.open("wb") as t:
        for i in range(n):
            rate, j = (E0, i) if i < n_clean else (E1, i - n_clean)
            disagree = math.floor((j + 1) * rate) > math.floor(j * rate)  # exactly `rate` of every run of events
            ts = START_MS + i * step_ms
            student = [0.1, 0.9] if disagree else [0.9, 0.1]
            p.write(orjson.dumps({"request_id": f"r{i}", "model": "m", "student_version": "s1", "ts": ts, "probs": student}) + b"\n")
            t.write(orjson.dumps({"request_id": f"r{i}", "model": "m", "teacher_version": "t1", "ts": ts + 500,
                                  "probs": [0.8, 0.2]}) + b"\n")
    return predictions, teacher


def theoretical_minutes() -> tuple[float, str]:
    budget = 1 - OBJECTIVE
    best = (math.inf, "")
    for name, long_min, short_min, burn in PAGE_TIERS:
        need = burn * budget
        if need >= E1:
            continue  # this tier can never fire at this error rate
        t = max(w * (need - E0) / (E1 - E0) for w in (long_min, short_min))
        best = min(best, (t, name))
    return best


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        predictions, teacher = write_traffic(folder)
        slo = folder / "slo.yaml"
        slo.write_text(f"slos:\n  - name: agreement\n    model: m\n    objective: {OBJECTIVE}\n    period: 30d\n"
                       "    sli: {events: {metric: agreement}}\n")
        out = subprocess.run([KDWATCH, "analyze", "--predictions", str(predictions), "--teacher", str(teacher),
                              "--window", "1m", "--grace", "2m", "--slo", str(slo)], capture_output=True, text=True, check=True)
    notes = [json.loads(line) for line in out.stdout.splitlines() if '"type":"alert"' in line.replace(" ", "")]
    incident_ms = START_MS + CLEAN_H * 3_600_000
    pages = [n for n in notes if n["severity"] == "page" and n["status"] == "firing"]
    before = [n for n in notes if n["status"] == "firing" and _ms(n["at"]) < incident_ms]
    theory, tier = theoretical_minutes()
    print(f"\nagreement {1 - E0:.1%} for {CLEAN_H} h, then {1 - E1:.0%}; SLO {OBJECTIVE:.0%} over 30 days\n")
    print("| | minutes after the incident starts | tier |")
    print("|---|---|---|")
    print(f"| SRE workbook (theory) | {theory:.1f} | {tier} |")
    for page in pages[:2]:
        print(f"| kdwatch page ({page['status']}) | {(_ms(page['at']) - incident_ms) / 60_000:.1f} | {page['tier']} |")
    print(f"\nalerts firing before the incident (false positives): {len(before)}")


def _ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


if __name__ == "__main__":
    main()
