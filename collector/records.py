"""What the join produces and keeps, and how it is stored: buffer entries, window keys, transfer records.

Plain data and their JSON codecs, shared by the engine (``kdwatch.collector.columnar``), the store
(``kdwatch.storage.sql``) and the training runner, so none of those imports another's logic.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from kdwatch.analyzer.window import WindowState
from kdwatch.collector.contract import Distribution, Generation

PREDICTION, TEACHER, LABEL = "p", "t", "l"
INPUTS = ("prediction", "teacher", "label")
# Every reason a record can be dead-lettered for (the contract's rejections, then the join's outcomes),
# so the exporter can report each at 0 before it first happens: a counter that appears at its first
# value hides that increase from rate() (tests/unit/collector/test_contract.py checks the list is whole).
DEAD_LETTER_REASONS = (
    "invalid_json", "invalid_utf8", "not_an_object", "too_large", "unsupported_version", "unknown_field", "missing_field",
    "wrong_type", "empty_string", "string_too_long", "not_finite", "negative_probability", "probs_not_normalised",
    "probs_or_logits", "bad_class_count", "label_out_of_range", "bad_audit", "bad_latency", "bad_feature_name",
    "too_many_features", "invalid_timestamp", "timestamp_out_of_range", "future_timestamp", "class_count_mismatch",
    "bad_generation", "generative_mismatch", "generation_length_mismatch", "late", "unmatched",
)
NO_SEGMENT = "_none"


class Source(NamedTuple):
    """Where a record came from: enough to dead-letter it later."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes


class WindowKey(NamedTuple):
    model: str
    student_version: str
    window_start: int


@dataclass(slots=True)
class Entry:
    """One join-buffer entry: a prediction of an open window, or an early replay / label."""

    kind: str
    model: str
    request_id: str
    window_start: int
    version: str = ""
    dist: Distribution | None = None  # the student's (p) or the teacher's (t)
    label: int | None = None
    # p: the joined replay, kept for a label that comes later (a classifier's) or the transfer set (a generative one's)
    teacher: Distribution | Generation | None = None
    has_teacher: bool = False
    has_label: bool = False
    audit: bool = False
    source: Source | None = None  # t, l: for the dead-letter topic when they expire unmatched
    segment: str | None = None  # p: the prediction's segment, for the per-segment counts of later joins
    features: dict[str, Any] | None = None  # p: kept only when the transfer set is on
    ts_ms: int = 0  # p: the event time (for the transfer set)
    gen: Generation | None = None  # a generative student's sequence (p), or the teacher's scoring of it (t)


@dataclass(slots=True)
class DeadLetter:
    source: Source
    reason: str
    message: str


@dataclass(slots=True)
class TransferRecord:
    """One joined prediction kept for distillation: what the runner trains the next student on.

    A generative student's record holds its generation and the teacher's scoring of it (``Generation``),
    with the prompt in ``features["prompt_tokens"]``.
    """

    model: str
    request_id: str
    ts_ms: int
    student_version: str
    features: dict[str, Any]
    teacher: Distribution | Generation
    student: Distribution | Generation
    label: int | None


def transfer_rank(model: str, request_id: str) -> int:
    """A deterministic pseudo-random rank: a window keeps its lowest-ranked joined predictions.

    Hashing (not a random draw) makes the sample reproducible: a collector that re-reads after a
    crash, or the offline path, keeps exactly the same records.
    """
    return int.from_bytes(hashlib.blake2b(f"{model}\x00{request_id}".encode(), digest_size=8).digest(), "big")


@dataclass
class PartitionSnapshot:
    """What a collector needs to resume a co-partition exactly where the last commit left it."""

    offsets: dict[str, int]
    watermark: int | None
    windows: dict[WindowKey, WindowState]
    entries: list[Entry]
    observed: dict[str, int] = field(default_factory=dict)  # input kind -> highest event time processed


@dataclass
class EngineDelta:
    """What a commit changes of the columnar engine's stored buffer (collector.live_columns, collector.column_state).

    ``put``: (kind, model, seq, last window start, Arrow IPC blob) rows to insert or replace; ``delete``:
    (kind, model, seq) rows to remove (model "" for a chunk: any model); ``purge_through``: join patches
    whose last window start is at or before it go (their windows are closed); ``meta``: the engine's
    scalars (watermark, merge position, pending counts) as JSON.
    """

    meta: dict[str, Any]
    put: list[tuple[str, str, int, int, bytes]] = field(default_factory=list)
    delete: list[tuple[str, str, int]] = field(default_factory=list)
    purge_through: int | None = None


@dataclass
class Changes:
    """What one batch changed, to be made durable in one transaction."""

    upserted: dict[tuple[str, str, str], Entry] = field(default_factory=dict)
    deleted: set[tuple[str, str, str]] = field(default_factory=set)
    # Window starts closed now: every buffer entry of these windows goes (one range delete, not one per entry).
    closed_starts: set[int] = field(default_factory=set)
    windows: dict[WindowKey, WindowState] = field(default_factory=dict)  # open windows touched
    closed: dict[WindowKey, WindowState] = field(default_factory=dict)  # windows closed now (final)
    late: dict[WindowKey, int] = field(default_factory=lambda: defaultdict(int))
    dead_letters: list[DeadLetter] = field(default_factory=list)
    counters: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    watermark: int | None = None
    observed: dict[str, int] | None = None  # set when an input's highest event time moved
    transfer: list[TransferRecord] = field(default_factory=list)  # sampled from the windows closed now
    engine: EngineDelta | None = None  # the engine's buffer (collector.live_columns); None: entries (tests/record_joiner)


def dist_to_list(d: Distribution | None) -> list[Any] | None:
    """A JSON-able form of a distribution: [probs, log_probs or None]."""
    if d is None:
        return None
    return [d.probs.tolist(), d.log_probs.tolist() if d.log_probs is not None else None]


def dist_from_list(d: list[Any] | None) -> Distribution | None:
    if d is None:
        return None
    return Distribution(np.asarray(d[0], dtype=np.float64), None if d[1] is None else np.asarray(d[1], dtype=np.float64))


def gen_to_list(g: Generation | None) -> list[Any] | None:
    """A JSON-able form of a generation: [logprobs, tokens or None, top1 or None]."""
    if g is None:
        return None
    return [g.logprobs.tolist(), None if g.tokens is None else g.tokens.tolist(), None if g.top1 is None else g.top1.tolist()]


def gen_from_list(g: list[Any] | None) -> Generation | None:
    if g is None:
        return None
    ids = [None if v is None else np.asarray(v, dtype=np.int64) for v in g[1:]]
    return Generation(np.asarray(g[0], dtype=np.float64), ids[0], ids[1])


def transfer_to_dict(record: TransferRecord) -> dict[str, Any]:
    """The stored payload of a transfer record (the key columns hold model, request_id, ts and version)."""
    if isinstance(record.student, Generation):
        assert isinstance(record.teacher, Generation)
        return {"features": record.features, "teacher_generation": gen_to_list(record.teacher),
                "student_generation": gen_to_list(record.student), "label": None}
    assert isinstance(record.teacher, Distribution)
    return {"features": record.features, "teacher": dist_to_list(record.teacher), "student": dist_to_list(record.student),
            "label": record.label}


def transfer_from_row(model: str, request_id: str, ts_ms: int, student_version: str, payload: dict[str, Any]) -> TransferRecord:
    teacher: Distribution | Generation | None
    student: Distribution | Generation | None
    if "student_generation" in payload:
        teacher, student = gen_from_list(payload["teacher_generation"]), gen_from_list(payload["student_generation"])
    else:
        teacher, student = dist_from_list(payload["teacher"]), dist_from_list(payload["student"])
    assert teacher is not None and student is not None
    return TransferRecord(model, request_id, ts_ms, student_version, payload["features"], teacher, student, payload["label"])


def entry_to_dict(entry: Entry) -> dict[str, Any]:
    """A JSON-able form of a buffer entry (for storage)."""
    dist = dist_to_list
    src = entry.source
    return {
        "w": entry.window_start, "v": entry.version, "d": dist(entry.dist), "y": entry.label,
        "t": dist(entry.teacher) if not isinstance(entry.teacher, Generation) else None, "ht": entry.has_teacher,
        "hl": entry.has_label, "a": entry.audit, "g": entry.segment,
        "f": entry.features, "ts": entry.ts_ms, **({"G": gen_to_list(entry.gen)} if entry.gen is not None else {}),
        **({"T": gen_to_list(entry.teacher)} if isinstance(entry.teacher, Generation) else {}),
        "s": None if src is None else [src.topic, src.partition, src.offset, src.timestamp_ms,
                                       src.key.decode("utf-8", "replace") if src.key is not None else None,
                                       src.value.decode("utf-8")],
    }


def entry_from_dict(kind: str, model: str, request_id: str, data: dict[str, Any]) -> Entry:
    dist = dist_from_list
    s = data["s"]
    source = None if s is None else Source(s[0], s[1], s[2], s[3], None if s[4] is None else s[4].encode(), s[5].encode())
    teacher = gen_from_list(data["T"]) if "T" in data else dist(data["t"])
    return Entry(kind, model, request_id, data["w"], data["v"], dist(data["d"]), data["y"], teacher,
                 data["ht"], data["hl"], data["a"], source, data.get("g"), data.get("f"), data.get("ts", 0),
                 gen_from_list(data.get("G")))
