"""The teacher replayer against the real broker: TorchScript and HTTP teachers, deterministic samples, dead letters."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import orjson
import torch

from kdwatch.collector.consumer import DLT_SUFFIX, ensure_topics
from kdwatch.collector.replayer import Replayer, ReplayerConfig, sampled
from kdwatch.collector.teachers import HttpTeacher, TorchScriptTeacher
from kdwatch.producer import PredictionLogger
from kdwatch.runner.distill import StudentMLP
from kdwatch.runner.registry import Registry
from tests.integration.helpers import new_topics, read_topic

TS = 1_795_000_030_000
FEATURES = ["x0", "x1", "x2", "x3"]


def send_predictions(kafka: str, topic: str, n: int) -> dict[str, list[float]]:
    rng = np.random.default_rng(0)
    sent = {}
    with PredictionLogger(kafka, "m", "s1", predictions_topic=topic, strict=True) as logger:
        for i in range(n):
            x = [round(float(v), 4) for v in rng.normal(size=4)]
            sent[f"r{i}"] = x
            logger.log(f"r{i}", probs=[0.5, 0.5], features=dict(zip(FEATURES, x, strict=True)), ts_ms=TS + i)
        logger.log_audit("audit-1", member=True, label=0, probs=[0.9, 0.1], ts_ms=TS)  # never replayed
        assert logger.flush(30)
    return sent


def test_a_torchscript_teacher_replays_the_same_deterministic_sample_on_every_run(kafka: str, tmp_path: Path) -> None:
    topics = new_topics(kafka, partitions=2)
    sent = send_predictions(kafka, topics.predictions, 400)
    module = StudentMLP(4, (8,), 2).eval()
    registry = Registry(tmp_path)
    folder = registry.register("teacher", "t1", module, {"features": FEATURES})
    expected = {rid for rid in sent if sampled("m", rid, 0.25)}
    runs = []
    for run in ("a", "b"):
        teacher_topic = f"{topics.teacher}.{run}"
        ensure_topics(kafka, [teacher_topic], 2)
        config = ReplayerConfig(kafka, topics.predictions, teacher_topic, group_id=f"replayer-{run}", teacher_version="t1",
                                sample_rate=0.25, batch_size=16)
        Replayer(config, TorchScriptTeacher(folder / "model.torchscript")).run(idle_exit_s=3)
        runs.append(read_topic(kafka, teacher_topic))
    first, second = ({key.decode(): orjson.loads(value) for key, value, _h in records} for records in runs)
    assert set(first) == set(second) == expected
    assert 70 < len(expected) < 130
    rid = sorted(expected)[0]
    with torch.no_grad():
        want = module(torch.tensor([sent[rid]], dtype=torch.float32))[0].tolist()
    assert first[rid]["teacher_version"] == "t1" and first[rid]["ts"] == TS + int(rid[1:])
    assert np.allclose(first[rid]["logits"], want, atol=1e-6)


@contextmanager
def http_teacher() -> Iterator[tuple[str, list[int]]]:
    """Answers logits [x0, 0]; a batch holding an instance with x0 < -1.5 gets a 500 (that record is poison)."""
    batches: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = orjson.loads(self.rfile.read(int(self.headers["content-length"])))
            instances = body["instances"]
            batches.append(len(instances))
            if any(i["features"]["x0"] < -1.5 for i in instances):
                self.send_response(500)
                self.end_headers()
                return
            payload = orjson.dumps({"predictions": [{"logits": [i["features"]["x0"], 0.0]} for i in instances]})
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/models/teacher:predict", batches
    finally:
        server.shutdown()
        server.server_close()


def test_an_http_teacher_replays_and_records_it_cannot_score_are_dead_lettered(kafka: str) -> None:
    topics = new_topics(kafka, partitions=1)
    ensure_topics(kafka, [topics.teacher + DLT_SUFFIX], 1)
    sent = send_predictions(kafka, topics.predictions, 300)
    with http_teacher() as (url, batches):
        config = ReplayerConfig(kafka, topics.predictions, topics.teacher, group_id="replayer-http", teacher_version="t2",
                                sample_rate=1.0, batch_size=32, retries=1, backoff_s=0.01)
        teacher = HttpTeacher(url)
        Replayer(config, teacher).run(idle_exit_s=3)
        teacher.client.close()
    poison = {rid for rid, x in sent.items() if x[0] < -1.5}
    assert poison  # the data holds some
    replays = {key.decode(): orjson.loads(value) for key, value, _h in read_topic(kafka, topics.teacher)}
    assert set(replays) == set(sent) - poison
    assert all(replays[rid]["logits"] == [sent[rid][0], 0.0] for rid in replays)
    dead = read_topic(kafka, topics.teacher + DLT_SUFFIX)
    assert {key.decode() for key, _v, _h in dead if key} == poison
    headers = dead[0][2]
    assert headers["kdwatch.error.class"] == b"teacher_error" and b"HTTP 500" in headers["kdwatch.error.message"]
    assert headers["kdwatch.component"] == b"replayer" and headers["kdwatch.original.topic"] == topics.predictions.encode()
    assert max(batches) == 32  # batched calls, then single-record calls to isolate the poison
