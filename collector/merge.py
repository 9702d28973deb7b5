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
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from kdwatch.collector.records import INPUTS

T = TypeVar("T")
UNREADABLE = -1  # the merge key of a record whose event time cannot be read


@dataclass
class _Input(Generic[T]):
    queue: deque[tuple[int, T]] = field(default_factory=deque)
    at_end: bool = False
    idle_since: float | None = None  # when it was last seen empty and at its end


class EventTimeMerge(Generic[T]):
    """Merge of one co-partition's inputs; see the module docstring for the rule.

    ``push`` queues an input's records with their merge keys, ``set_at_end`` says whether an input
    has nothing more to fetch right now, and ``next`` hands out the records in merge order (None when
    the next one cannot be decided yet). ``idle()`` tells which inputs no longer hold the watermark back.
    """

    def __init__(self, idle_timeout_s: float, kinds: tuple[str, ...] = INPUTS, clock: Callable[[], float] = time.monotonic) -> None:
        if idle_timeout_s < 0:
            raise ValueError("the idle timeout must be >= 0")
        self.idle_timeout_s = idle_timeout_s
        self.clock = clock
        self.inputs: dict[str, _Input[T]] = {kind: _Input() for kind in kinds}
        self._order = {kind: i for i, kind in enumerate(kinds)}

    def push(self, kind: str, key: int, item: T) -> None:
        state = self.inputs[kind]
        state.queue.append((key, item))
        state.idle_since = None

    def set_at_end(self, kind: str, at_end: bool) -> None:
        state = self.inputs[kind]
        state.at_end = at_end
        if not at_end or state.queue:
            state.idle_since = None
        elif state.idle_since is None:
            state.idle_since = self.clock()

    def queued(self, kind: str | None = None) -> int:
        if kind is not None:
            return len(self.inputs[kind].queue)
        return sum(len(s.queue) for s in self.inputs.values())

    def _is_idle(self, state: _Input[T], now: float) -> bool:
        if state.queue or not state.at_end:
            return False
        if state.idle_since is None:
            state.idle_since = now
        return now - state.idle_since >= self.idle_timeout_s

    def idle(self) -> dict[str, bool]:
        """Per input: idle (empty, at its end, for the timeout), so it does not hold the watermark back."""
        now = self.clock()
        return {kind: self._is_idle(state, now) for kind, state in self.inputs.items()}

    def next(self) -> tuple[str, T] | None:
        """The next record in merge order, or None while an input that is not idle has nothing queued."""
        best: tuple[int, int, str] | None = None
        now = self.clock()
        blocked = False
        for kind, state in self.inputs.items():
            if state.queue:
                key = state.queue[0][0]
                if best is None or (key, self._order[kind]) < best[:2]:
                    best = (key, self._order[kind], kind)
            elif not self._is_idle(state, now):
                blocked = True
        if best is None:
            return None
        if blocked and best[0] != UNREADABLE:
            return None
        _key, item = self.inputs[best[2]].queue.popleft()
        return best[2], item

    def clear(self) -> None:
        for state in self.inputs.values():
            state.queue.clear()
            state.idle_since = None
            state.at_end = False
