"""The order in which one co-partition's records are processed: the same rule for Kafka and for files.

Records of the three inputs (predictions, teacher replays, labels) are merged by event time: the next
record processed is the one with the lowest merge key among the heads of the inputs' queues (ties:
predictions, then replays, then labels), each input keeping its own order (a Kafka partition's, a
file's). A record is taken only when every input either has a record queued, or is *idle*: nothing
queued, nothing more to fetch (at its end), for at least the idle timeout of wall-clock time. So the
sequence does not depend on when records happen to be fetched, only on each input's contents,
as in Kafka Streams (``max.task.idle.ms``) and Flink (``withIdleness``). The one remaining
condition: an input idle longer than the timeout whose records then arrive is merged where they
arrive, not where their event times would have put them.

The merge key is the event time; a record whose event time cannot be read has key -1 (it changes
no state but counters, so it may go at once). Files use the same merge with a timeout of zero:
a file at its end has nothing more to come.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kdwatch.collector.records import INPUTS

UNREADABLE = -1  # the merge key of a record whose event time cannot be read


class Idleness:
    """The idle rule alone, for inputs whose records a caller queues itself (collector.live_columns).

    An input is idle when it has nothing queued and nothing more to fetch (at its end) for at least
    ``idle_timeout_s`` of wall-clock time: the rule of the module docstring.
    """

    def __init__(self, idle_timeout_s: float, kinds: tuple[str, ...] = INPUTS, clock: Callable[[], float] = time.monotonic) -> None:
        if idle_timeout_s < 0:
            raise ValueError("the idle timeout must be >= 0")
        self.idle_timeout_s = idle_timeout_s
        self.clock = clock
        self.at_end = dict.fromkeys(kinds, False)
        self.since: dict[str, float | None] = dict.fromkeys(kinds)  # when each was last seen empty and at its end

    def update(self, kind: str, at_end: bool, queued: int) -> None:
        self.at_end[kind] = at_end
        if not at_end or queued:
            self.since[kind] = None
        elif self.since[kind] is None:
            self.since[kind] = self.clock()

    def is_idle(self, kind: str, queued: int, now: float) -> bool:
        if queued or not self.at_end[kind]:
            return False
        since = self.since[kind]
        if since is None:
            since = self.since[kind] = now
        return now - since >= self.idle_timeout_s

    def idle(self, queued: dict[str, int]) -> dict[str, bool]:
        now = self.clock()
        return {kind: self.is_idle(kind, queued.get(kind, 0), now) for kind in self.at_end}


def watermark_candidate(observed: dict[str, int], caught_up: dict[str, bool]) -> int | None:
    """The least newest event time over the inputs still being read (Flink's min-over-inputs watermark).

    ``observed``: input kind -> highest event time seen; an input with nothing left to read counts as
    the newest time seen anywhere. None while an input that is still read has shown nothing: it may
    hold anything. The columnar engine moves its
    watermark by this rule row by row (collector.columnar) and the Kafka collector with its idle inputs.
    """
    if not observed:
        return None
    newest = max(observed.values())
    candidates = []
    for kind in INPUTS:
        if caught_up.get(kind, False):
            candidates.append(newest)
        elif kind in observed:
            candidates.append(observed[kind])
        else:
            return None
    return min(candidates)


def window_start_of(ts_ms: int, window_ms: int) -> int:
    """Tumbling windows aligned to the epoch."""
    return ts_ms - ts_ms % window_ms
