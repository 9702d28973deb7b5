"""The per-record merge of one co-partition's inputs (collector.merge's rule), record by record: the record joiner's."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from kdwatch.collector.merge import UNREADABLE, Idleness
from kdwatch.collector.records import INPUTS

T = TypeVar("T")


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
