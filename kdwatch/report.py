"""The self-contained HTML report of one model: charts drawn server-side as inline SVG (matplotlib).

No script, stylesheet or font is fetched: the page renders with no network.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: render to SVG only
import matplotlib.dates as mdates
import matplotlib.pyplot as plt
import numpy as np

from kdwatch.analyzer.drift import Reference
from kdwatch.analyzer.membership import roc_points
from kdwatch.analyzer.rollup import Bucket
from kdwatch.analyzer.window import WindowState
from kdwatch.timestamps import rfc3339

PSI_CHART_FEATURES = 20
# What the fidelity chart and the summary cards show: a classifier's fields, or a generative student's.
CLASSIFIER_PANELS = (("agreement", "agreement"), ("kl_mean", "KL(teacher‖student)"), ("ece", "ECE"),
                     ("accuracy_delta", "accuracy delta"))
GENERATIVE_PANELS = (("token_agreement", "token agreement"), ("teacher_ppl", "teacher perplexity"),
                     ("kl_rev_mean", "reverse KL per token"), ("seq_agreement", "sequence agreement"))

plt.rcParams.update({"svg.fonttype": "path", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False})


@dataclass
class ReportData:
    model: str
    step: str
    buckets: list[Bucket]
    reference: Reference | None
    budgets: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # SLO -> (ms, budget remaining)
    events: list[dict[str, Any]] = field(default_factory=list)  # alert and retrain notifications


def _svg(fig: Any) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _times(buckets: list[Bucket]) -> np.ndarray:
    return np.array([b.start_ms for b in buckets], dtype="datetime64[ms]")


def _fidelity_chart(data: ReportData, generative: bool) -> str:
    # One line per student version, so a retrained student shows as a new series.
    versions: dict[str, list[Bucket]] = {}
    for b in data.buckets:
        versions.setdefault(b.student_version, []).append(b)
    fig, axes = plt.subplots(4, 1, figsize=(9, 7), sharex=True)
    for ax, (field_name, label) in zip(axes, GENERATIVE_PANELS if generative else CLASSIFIER_PANELS, strict=True):
        for version, buckets in versions.items():
            results = [b.state.result(data.reference) for b in buckets]
            values = [r[field_name] if r[field_name] is not None else np.nan for r in results]
            ax.plot(_times(buckets), values, marker=".", linewidth=1, label=f"student {version}")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if len(versions) > 1:
        axes[0].legend(loc="lower left")
    fig.autofmt_xdate()
    return _svg(fig)


def _reliability_chart(merged: WindowState) -> str:
    fig, ax = plt.subplots(figsize=(4.2, 4))
    bins = merged.calibration.reliability()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    if bins:
        ax.bar([b["low"] for b in bins], [b["accuracy"] for b in bins], width=1 / 15, align="edge", alpha=0.6, label="accuracy")
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", linewidth=1, label="per bin")
    ax.set_xlabel("student top-1 confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"reliability (ECE {merged.calibration.ece() or 0:.3f}, n={merged.calibration.n})")
    return _svg(fig)


def _psi_chart(merged: WindowState, reference: Reference | None) -> str:
    fig, ax = plt.subplots(figsize=(5, 4))
    result = merged.drift.result(reference)
    values = {k: v for k, v in (result["psi"] or {}).items() if v is not None}
    if values:
        # The PSI_CHART_FEATURES highest: a chart of 64 pixels' bars is unreadable; the API lists them all.
        names = sorted(values, key=lambda k: values[k])[-PSI_CHART_FEATURES:]
        expected = result["psi_expected"] or {}
        ax.barh(names, [values[n] for n in names], label="PSI")
        ax.scatter([expected.get(n) or 0 for n in names], names, color="black", marker="|", s=80, label="expected, no drift")
        ax.axvline(0.1, color="orange", linewidth=1)
        ax.axvline(0.25, color="red", linewidth=1)
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "no reference stored for this model", ha="center", va="center", transform=ax.transAxes)
    shown = f"the {PSI_CHART_FEATURES} highest " if len(values) > PSI_CHART_FEATURES else ""
    ax.set_title(f"PSI per feature, {shown}(whole range vs reference)")
    return _svg(fig)


def _roc_chart(merged: WindowState) -> str:
    fig, ax = plt.subplots(figsize=(4.2, 4))
    rows = merged.membership.rows
    members = np.array([r[2] for r in rows if r[1]])
    nonmembers = np.array([r[2] for r in rows if not r[1]])
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    if members.size and nonmembers.size:
        fpr, tpr, _tp = roc_points(members, nonmembers)
        ax.plot(fpr, tpr, linewidth=1.5)
        result = merged.membership.result() or {}
        ax.set_title(f"membership inference ROC (loss attack, AUC {result.get('auc', 0):.3f})")
    else:
        ax.set_title("membership inference: no audit records")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    return _svg(fig)


def _budget_chart(data: ReportData) -> str:
    fig, ax = plt.subplots(figsize=(9, 3))
    for name, points in sorted(data.budgets.items()):
        if points:
            ax.plot(np.array([t for t, _ in points], dtype="datetime64[ms]"), [v for _, v in points], label=name)
    for event in data.events:
        moment = mdates.date2num(datetime.fromisoformat(event["at"].replace("Z", "+00:00")))
        color = "red" if event.get("severity") == "page" else "orange" if event["type"] == "alert" else "purple"
        ax.axvline(moment, color=color, linewidth=0.8, alpha=0.7)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_ylabel("error budget remaining")
    ax.set_title("SLO budget burn-down (vertical lines: alerts red/orange, retrains purple)")
    if data.budgets:
        ax.legend(loc="lower left")
    fig.autofmt_xdate()
    return _svg(fig)


def render(data: ReportData) -> str:
    merged = WindowState()
    for b in data.buckets:
        merged.merge(b.state)
    summary = merged.result(data.reference)
    first = rfc3339(data.buckets[0].start_ms) if data.buckets else "-"
    last = rfc3339(data.buckets[-1].start_ms) if data.buckets else "-"
    rows = "".join(
        f"<tr><td>{html.escape(e['at'])}</td><td>{html.escape(e['type'])}</td>"
        f"<td>{html.escape(str(e.get('status', '')))}</td><td>{html.escape(str(e.get('slo', e.get('reason', ''))))}</td>"
        f"<td>{html.escape(str(e.get('severity', '')))} {html.escape(str(e.get('tier', '')))}</td></tr>"
        for e in data.events)

    def fmt(value: Any) -> str:
        return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))

    generated = rfc3339(int(datetime.now(UTC).timestamp()) * 1000)
    generative = merged.generative.active
    shown = ("n", "n_joined", "n_tokens", "token_agreement", "teacher_ppl", "kl_rev_mean") if generative else (
        "n", "n_joined", "agreement", "kl_mean", "ece", "accuracy_delta")
    cards = "".join(f"<div class=card><b>{fmt(summary[k])}</b><span>{k}</span></div>" for k in shown)
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>kdwatch report: {html.escape(data.model)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:24px;color:#222}} h1{{margin:0 0 4px}} .meta{{color:#666}}
.cards{{display:flex;gap:12px;margin:16px 0}} .card{{border:1px solid #ddd;border-radius:6px;padding:8px 14px}}
.card b{{display:block;font-size:20px}} .card span{{color:#666;font-size:12px}}
.grid{{display:flex;flex-wrap:wrap;gap:16px}} figure{{margin:0}} svg{{max-width:100%;height:auto}}
table{{border-collapse:collapse}} td,th{{border-bottom:1px solid #eee;padding:4px 10px;text-align:left}}
</style></head><body>
<h1>{html.escape(data.model)}</h1>
<div class=meta>windows {first} … {last}, step {html.escape(data.step)}, generated {generated}</div>
<div class=cards>{cards}</div>
<h2>Fidelity over time</h2><figure id=fidelity>{_fidelity_chart(data, generative)}</figure>
<div class=grid>
<figure id=reliability>{_reliability_chart(merged)}</figure>
<figure id=psi>{_psi_chart(merged, data.reference)}</figure>
<figure id=roc>{_roc_chart(merged)}</figure>
</div>
<h2>SLO budgets</h2><figure id=budget>{_budget_chart(data)}</figure>
<h2>Alerts and retrains</h2>
<table><tr><th>at</th><th>type</th><th>status</th><th>slo / reason</th><th>severity</th></tr>{rows}</table>
</body></html>"""
