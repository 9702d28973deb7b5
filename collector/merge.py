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
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from kdwatch.collector.records import INPUTS

T = TypeVar("T")
UNREADABLE = -1  # the merge key of a record whose event time cannot be read


class Idleness:
    """The idle rule alone, for inputs whose records a caller queues itself (collector.live_columns).

    An input is idle when it has nothing queued and nothing more to fetch (at its end) for at least
    ``idle_timeout_s`` of wall-clock time: exactly EventTimeMerge's rule.
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


class EventTimeMerge(Generic[T]):
    """Merge of one co-partition's inputs; see the module docstring for the rule.

    ``push`` queues an input's records with their merge keys, ``set_at_end`` says whether an input
    has nothing more to fetch right now, and ``next`` hands out the records in merge order (None when
    the next one cannot be decided yet). ``idle()`` tells which inputs no longer hold the watermark back.
    """

    def __init__(self, idle_timeout_s: float, kinds: tuple[str, ...] = INPUTS, clock: Callable[[], float] = time.monotonic) -> None:
        self.idleness = Idleness(idle_timeout_s, kinds, clock)
        self.queues: dict[str, deque[tuple[int, T]]] = {kind: deque() for kind in kinds}
        self._order = {kind: i for i, kind in enumerate(kinds)}

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(self.queues)

    def at_end(self, kind: str) -> bool:
        return self.idleness.at_end[kind]

    def push(self, kind: str, key: int, item: T) -> None:
        self.queues[kind].append((key, item))
        self.idleness.since[kind] = None

    def set_at_end(self, kind: str, at_end: bool) -> None:
        self.idleness.update(kind, at_end, len(self.queues[kind]))

    def queued(self, kind: str | None = None) -> int:
        if kind is not None:
            return len(self.queues[kind])
        return sum(len(q) for q in self.queues.values())

    def idle(self) -> dict[str, bool]:
        """Per input: idle (empty, at its end, for the timeout), so it does not hold the watermark back."""
        return self.idleness.idle({kind: len(q) for kind, q in self.queues.items()})

    def next(self) -> tuple[str, T] | None:
        """The next record in merge order, or None while an input that is not idle has nothing queued."""
        best: tuple[int, int, str] | None = None
        for kind, queue in self.queues.items():
            if queue:
                key = queue[0][0]
                if best is None or (key, self._order[kind]) < best[:2]:
                    best = (key, self._order[kind], kind)
        if best is None:
            return None
        if best[0] != UNREADABLE:
            now: float | None = None
            for kind, queue in self.queues.items():
                if not queue:
                    now = self.idleness.clock() if now is None else now
                    if not self.idleness.is_idle(kind, 0, now):
                        return None
        _key, item = self.queues[best[2]].popleft()
        return best[2], item

    def clear(self) -> None:
        for kind, queue in self.queues.items():
            queue.clear()
            self.idleness.since[kind] = None
            self.idleness.at_end[kind] = False
