"""The request_id join and event-time windows, as pure logic (no Kafka, no database)."""

from __future__ import annotations

import numpy as np

from kdwatch.collector.contract import Distribution, Label, Prediction, TeacherReplay
from kdwatch.collector.records import Source, WindowKey, entry_from_dict, entry_to_dict
from tests.record_joiner.join import PartitionJoiner, window_start_of

MIN = 60_000
T0 = 1_795_000_020_000  # inside the window starting at 1_794_999_960_000
W0 = window_start_of(T0, MIN)
ALL_READ = {"prediction": False, "teacher": False, "label": False}


def dist(*p: float) -> Distribution:
    return Distribution(np.asarray(p, dtype=np.float64), None)


def prediction(rid: str, ts: int = T0, probs: tuple[float, ...] = (0.8, 0.2), **kw: object) -> Prediction:
    return Prediction(rid, "m", "s1", ts, dist(*probs), **kw)  # type: ignore[arg-type]


def teacher(rid: str, ts: int = T0 + 2_000, probs: tuple[float, ...] = (0.6, 0.4)) -> TeacherReplay:
    return TeacherReplay(rid, "m", "t1", ts, dist(*probs))


def label(rid: str, y: int = 0, ts: int = T0 + 30_000) -> Label:
    return Label(rid, "m", y, ts)


def source(offset: int, topic: str = "kdwatch.teacher") -> Source:
    return Source(topic, 0, offset, 0, b"k", b"{}")


def joiner(grace: int = 10 * MIN) -> PartitionJoiner:
    return PartitionJoiner(MIN, grace)


def state_of(j: PartitionJoiner, key: WindowKey | None = None) -> dict[str, object]:
    changes = j.end_batch(ALL_READ, close_all=True)
    return changes.closed[key or WindowKey("m", "s1", W0)].result()


def test_a_replay_arriving_after_its_prediction_joins() -> None:
    j = joiner()
    j.add_prediction(prediction("a"))
    j.add_teacher(teacher("a"))
    r = state_of(j)
    assert (r["n"], r["n_joined"], r["agreement"]) == (1, 1, 1.0)


def test_a_replay_and_a_label_arriving_before_their_prediction_join() -> None:
    j = joiner()
    j.add_teacher(teacher("a", probs=(0.3, 0.7)))
    j.add_label(label("a", y=1))
    j.end_batch(ALL_READ)
    j.add_prediction(prediction("a"))
    r = state_of(j)
    assert (r["n"], r["n_joined"], r["n_labeled"], r["agreement"]) == (1, 1, 1, 0.0)
    assert (r["accuracy_student"], r["accuracy_teacher"], r["accuracy_delta"]) == (0.0, 1.0, -1.0)


def test_a_replay_counts_in_its_predictions_window_not_its_own() -> None:
    j = joiner()
    j.add_prediction(prediction("a", ts=W0 + MIN - 1))
    j.add_teacher(teacher("a", ts=W0 + 2 * MIN + 5))
    changes = j.end_batch(ALL_READ, close_all=True)
    assert set(changes.closed) == {WindowKey("m", "s1", W0)}
    assert changes.closed[WindowKey("m", "s1", W0)].fidelity.n_joined == 1


def test_a_duplicate_prediction_replay_or_label_counts_once() -> None:
    j = joiner()
    for _ in range(3):
        j.add_prediction(prediction("a"))
        j.add_teacher(teacher("a"))
        j.add_label(label("a"))
    changes = j.end_batch(ALL_READ, close_all=True)
    r = changes.closed[WindowKey("m", "s1", W0)].result()
    assert (r["n"], r["n_joined"], r["n_labeled"], r["n_duplicate"]) == (1, 1, 1, 6)
    assert changes.counters[("prediction", "duplicate")] == 2


def test_a_window_closes_when_every_input_passed_its_end_plus_grace() -> None:
    j = joiner(grace=2 * MIN)
    j.add_prediction(prediction("a"))
    j.add_prediction(prediction("b", ts=W0 + 3 * MIN))  # predictions alone are past end + grace
    assert not j.end_batch(ALL_READ).closed  # replays and labels not read yet: the window stays open
    j.add_teacher(teacher("b", ts=W0 + 3 * MIN + 1))
    j.add_label(label("b", ts=W0 + 3 * MIN + 2))
    assert set(j.end_batch(ALL_READ).closed) == {WindowKey("m", "s1", W0)}


def test_a_caught_up_input_does_not_hold_the_watermark_back() -> None:
    j = joiner(grace=2 * MIN)
    j.add_prediction(prediction("a"))
    j.add_prediction(prediction("b", ts=W0 + 3 * MIN))
    closed = j.end_batch({"prediction": False, "teacher": True, "label": True}).closed
    assert set(closed) == {WindowKey("m", "s1", W0)}


def test_a_prediction_after_its_window_closed_is_late_and_dead_lettered() -> None:
    j = joiner(grace=MIN)
    j.add_prediction(prediction("a", ts=W0 + 5 * MIN))
    j.end_batch({"prediction": True, "teacher": True, "label": True})
    j.add_prediction(prediction("late"), source(7, "kdwatch.predictions"))
    changes = j.end_batch(ALL_READ)
    assert changes.late == {WindowKey("m", "s1", W0): 1}
    assert [(d.reason, d.source.offset) for d in changes.dead_letters] == [("late", 7)]


def test_an_unmatched_replay_is_dead_lettered_when_its_window_closes() -> None:
    j = joiner(grace=MIN)
    j.add_teacher(teacher("orphan"), source(3))
    j.add_prediction(prediction("a", ts=W0 + 5 * MIN))
    changes = j.end_batch({"prediction": True, "teacher": True, "label": True})
    assert [(d.reason, d.source.offset) for d in changes.dead_letters] == [("unmatched", 3)]
    assert changes.counters[("teacher", "unmatched")] == 1
    assert W0 in changes.closed_starts  # the orphan's window: its entries are deleted as a whole


def test_a_replay_with_another_class_count_is_rejected_and_the_prediction_kept() -> None:
    j = joiner()
    j.add_prediction(prediction("a"))
    j.add_teacher(TeacherReplay("a", "m", "t1", T0, dist(0.2, 0.3, 0.5)), source(9))
    changes = j.end_batch(ALL_READ, close_all=True)
    assert [d.reason for d in changes.dead_letters] == ["class_count_mismatch"]
    r = changes.closed[WindowKey("m", "s1", W0)].result()
    assert (r["n"], r["n_joined"]) == (1, 0)


def test_audit_records_feed_membership_only() -> None:
    j = joiner()
    j.add_prediction(prediction("m1", probs=(0.9, 0.1), label=0, audit="member"))
    j.add_prediction(prediction("n1", probs=(0.6, 0.4), label=0, audit="nonmember"))
    j.add_prediction(prediction("p"))
    r = state_of(j)
    assert (r["n"], r["n_audit"], r["n_labeled"]) == (1, 2, 0)
    assert r["mia"]["auc"] == 1.0


def test_batch_boundaries_do_not_change_the_result() -> None:
    rng = np.random.default_rng(1)
    events: list[tuple[str, object]] = []
    for i in range(300):
        ts = T0 + i * 1_000
        p = rng.dirichlet(np.ones(3))
        events.append(("p", Prediction(f"r{i}", "m", "s1", ts, Distribution(p, None))))
        if i % 3 == 0:
            events.append(("t", TeacherReplay(f"r{i}", "m", "t1", ts + 500, Distribution(rng.dirichlet(np.ones(3)), None))))
        if i % 4 == 0:
            events.append(("l", Label(f"r{i}", "m", int(rng.integers(3)), ts + 20_000)))
    results = []
    for batch in (1, 7, 1000):
        j = joiner(grace=MIN)
        closed = {}
        for n, (kind, event) in enumerate(events, start=1):
            getattr(j, {"p": "add_prediction", "t": "add_teacher", "l": "add_label"}[kind])(event)
            if n % batch == 0:
                closed.update(j.end_batch(ALL_READ).closed)
        closed.update(j.end_batch(ALL_READ, close_all=True).closed)
        results.append({k: s.result() for k, s in closed.items()})
    assert results[0] == results[1] == results[2]


def test_a_buffer_entry_survives_its_stored_form() -> None:
    j = joiner()
    j.add_prediction(Prediction("a", "m", "s1", T0, Distribution(np.array([0.25, 0.75]), np.log([0.25, 0.75])), label=1))
    j.add_teacher(teacher("a"))
    entry = j.end_batch(ALL_READ).upserted[("p", "m", "a")]
    again = entry_from_dict("p", "m", "a", entry_to_dict(entry))
    assert again.has_teacher and again.label == 1 and again.teacher is not None
    assert np.array_equal(again.dist.probs, entry.dist.probs)  # type: ignore[union-attr]


def test_segments_count_predictions_joins_and_labels_whichever_arrives_first() -> None:
    j = joiner()
    j.add_teacher(teacher("a", probs=(0.6, 0.4)))
    j.add_prediction(prediction("a", segment="eu"))
    j.add_prediction(prediction("b", segment="eu", probs=(0.3, 0.7)))
    j.add_teacher(teacher("b", probs=(0.6, 0.4)))
    j.add_label(label("b", y=1))
    j.add_prediction(prediction("c", segment="us"))
    r = state_of(j)
    assert r["segments"]["eu"] == {"n": 2, "n_joined": 2, "agreement": 0.5, "n_labeled": 1, "accuracy": 1.0}
    assert r["segments"]["us"] == {"n": 1, "n_joined": 0, "agreement": None, "n_labeled": 0, "accuracy": None}


def test_an_event_time_far_ahead_of_the_clock_is_rejected_not_trusted() -> None:
    j = PartitionJoiner(MIN, 10 * MIN, max_future_ms=3_600_000, clock=lambda: T0 / 1000)
    assert j.rejects_future("prediction", T0 + 3_600_001, source(1, "kdwatch.predictions"))
    assert not j.rejects_future("prediction", T0 + 3_600_000, None)
    changes = j.end_batch(ALL_READ)
    assert changes.counters[("prediction", "future_timestamp")] == 1
    assert [d.reason for d in changes.dead_letters] == ["future_timestamp"]
    assert j.watermark is None


def test_the_transfer_set_keeps_the_lowest_ranked_joined_predictions_of_each_window() -> None:
    from kdwatch.collector.records import transfer_rank

    j = PartitionJoiner(MIN, 10 * MIN, transfer_per_window=3)
    ids = [f"r{i}" for i in range(10)]
    for i, rid in enumerate(ids):
        j.add_prediction(prediction(rid, ts=T0 + i, features={"x": float(i)}, label=i % 2 if i < 5 else None))
        if i != 0:  # r0 never gets a replay: not a candidate however it ranks
            j.add_teacher(teacher(rid))
    j.add_prediction(prediction("no-features"))
    j.add_teacher(teacher("no-features"))
    j.add_prediction(prediction("audit", label=0, audit="member", features={"x": 1.0}))
    assert j.end_batch(ALL_READ).transfer == []  # nothing closed yet
    # Re-loading the buffer from storage (a restart) must keep the features and event times.
    restored = PartitionJoiner(MIN, 10 * MIN, transfer_per_window=3, windows=j.windows,
                               entries=[entry_from_dict(k, m, r, entry_to_dict(e)) for (k, m, r), e in j.entries.items()])
    for each in (j, restored):
        records = each.end_batch(ALL_READ, close_all=True).transfer
        expected = sorted(ids[1:], key=lambda rid: transfer_rank("m", rid))[:3]
        assert [r.request_id for r in records] == expected
        for r in records:
            i = int(r.request_id[1:])
            assert (r.ts_ms, r.features, r.label, r.student_version) == (T0 + i, {"x": float(i)}, i % 2 if i < 5 else None, "s1")
            assert r.teacher.probs.tolist() == [0.6, 0.4] and r.student.probs.tolist() == [0.8, 0.2]


def test_without_a_transfer_set_no_features_are_buffered() -> None:
    j = joiner()
    j.add_prediction(prediction("a", features={"x": 1.0}))
    j.add_teacher(teacher("a"))
    assert all(e.features is None for e in j.entries.values())
    assert j.end_batch(ALL_READ, close_all=True).transfer == []
