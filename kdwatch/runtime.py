"""Process-wide tuning for kdwatch's long-running processes, applied by their commands (never by library code)."""

from __future__ import annotations

import gc

# First generation collected every 50,000 net allocations instead of 700; the second every 20 first-generation
# collections; the oldest on CPython's own rule (25 % more long-lived objects since the last full pass).
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Keep garbage collection off the hot path of a server or a collector.

    A process that has started holds ~120,000 objects that live as long as it does (modules, the app,
    SQLAlchemy, pandas and kafka-python internals), and a collector also holds its join buffer (some
    fifteen objects per buffered prediction). With CPython's default thresholds every full collection
    walked them all: in `kdwatch serve` that was ~60 ms during which no request was answered (the windows
    endpoint's p99 went from 75 to 8 ms without it), in `kdwatch collect` a fifth of the time (24,900 ->
    29,600 events/s in benchmarks/ingest.py's setting). ``gc.freeze()`` puts the start-up heap out of the
    collector's sight; the larger thresholds make collections rarer. Garbage still goes: the objects here
    rarely form cycles, and reference counting frees the rest at once.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
