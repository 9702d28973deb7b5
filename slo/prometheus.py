"""Prometheus-native burn-rate rules generated from the SLO YAML (as Sloth does for its specs).

For teams that prefer Prometheus' own alerting: the events SLIs that kdwatch exports as counters
(``agreement`` and ``accuracy``, as ``kdwatch_sli_events_total{sli, outcome}``) become recording
rules of the error ratio over every window of the burn-rate pairs, and one alert per pair with its
``tier`` label. Sketch-based SLIs (latency, kl) and timeslices stay with kdwatch's own engine.

Where they differ from kdwatch's engine: these are the plain workbook rules. The engine's
significance guard (slo.burn.long_window_burning: the long window's exact binomial lower bound above
the threshold) needs the inverse regularised incomplete beta function, which PromQL lacks, and the
resolve hold needs state across evaluations; each alert's ``guard`` annotation says so.
"""

from __future__ import annotations

from typing import Any

from kdwatch.durations import format_duration_ms
from kdwatch.slo.burn import windows_from_config
from kdwatch.slo.config import SloFile

COUNTER_SLIS = ("agreement", "accuracy", "token_agreement")


def _ratio(slo_name: str, sli: str, model: str, window: str) -> dict[str, Any]:
    selector = f'model="{model}",sli="{sli}"'
    return {
        "record": f"kdwatch:slo_error_ratio:rate{window}",
        "expr": (f'sum(rate(kdwatch_sli_events_total{{{selector},outcome="bad"}}[{window}])) '
                 f"/ sum(rate(kdwatch_sli_events_total{{{selector}}}[{window}]))"),
        "labels": {"slo": slo_name, "model": model, "sli": sli},
    }


def rules(config: SloFile) -> dict[str, Any]:
    groups = []
    for slo in config.slos:
        if slo.sli.events is None or slo.sli.events.metric not in COUNTER_SLIS:
            continue
        sli = slo.sli.events.metric
        pairs = windows_from_config(slo.period, slo.alerting.windows)
        lengths = sorted({p.long_ms for p in pairs} | {p.short_ms for p in pairs})
        recording = [_ratio(slo.name, sli, slo.model, format_duration_ms(ms)) for ms in lengths]
        budget = 1.0 - slo.objective
        alerts = []
        for p in pairs:
            long_w, short_w = format_duration_ms(p.long_ms), format_duration_ms(p.short_ms)
            threshold = round(p.burn_rate * budget, 12)
            alerts.append({
                "alert": "KdwatchSloBurn",
                "expr": (f'kdwatch:slo_error_ratio:rate{long_w}{{slo="{slo.name}"}} > {threshold} '
                         f'and kdwatch:slo_error_ratio:rate{short_w}{{slo="{slo.name}"}} > {threshold}'),
                "labels": {"severity": p.severity, "tier": p.tier, "slo": slo.name, "model": slo.model},
                "annotations": {"summary": f"SLO {slo.name} of {slo.model} burns its error budget faster than "
                                           f"{p.burn_rate}x over {long_w} and {short_w}",
                                "guard": f"plain workbook rule: kdwatch's engine also needs the {long_w} bad fraction "
                                         f"significantly above {threshold} (confidence {slo.alerting.confidence}) and holds "
                                         "a firing alert until its short window is quiet for the resolve hold"},
            })
        groups.append({"name": f"kdwatch-slo-{slo.name}-recordings", "rules": recording})
        groups.append({"name": f"kdwatch-slo-{slo.name}-alerts", "rules": alerts})
    return {"groups": groups}
