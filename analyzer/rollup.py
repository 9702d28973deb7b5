"""Roll-ups: merge window states into coarser steps (1m -> 5m -> 1h -> 1d), exactly, not averaged."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kdwatch.analyzer.window import WindowState


@dataclass
class Bucket:
    model: str
    student_version: str
    start_ms: int
    state: WindowState
    final: bool
    windows: int


def rollup(windows: Iterable[tuple[str, str, int, WindowState, bool]], step_ms: int) -> list[Bucket]:
    """Merge (model, version, window_start, state, final) into ``step_ms`` buckets aligned to the epoch.

    A bucket is final when every window in it is. States are merged into fresh copies, so the inputs
    are left untouched.
    """
    buckets: dict[tuple[str, str, int], Bucket] = {}
    for model, version, start, state, final in windows:
        key = (model, version, start - start % step_ms)
        bucket = buckets.get(key)
        if bucket is None:
            buckets[key] = Bucket(model, version, key[2], WindowState().merge(state), final, 1)
        else:
            bucket.state.merge(state)
            bucket.final = bucket.final and final
            bucket.windows += 1
    return sorted(buckets.values(), key=lambda b: (b.start_ms, b.model, b.student_version))
