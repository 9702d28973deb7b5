"""Sequence teachers for generative students: a TorchScript causal LM, and an OpenAI-compatible completions server
answering with prompt log-probabilities in vLLM's shape (a local server of that shape, on the same tiny model)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch

from kdwatch.collector.contract import decode_prediction, decode_teacher
from kdwatch.collector.replayer import Replayer, ReplayerConfig
from kdwatch.collector.teachers import CompletionsTeacher, TeacherError, TorchScriptLanguageModel
from kdwatch.runner.registry import torchscript_allowed

VOCAB = 40


class Bigram(torch.nn.Module):
    """The next token's logits from the current one: the smallest causal language model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.out = torch.nn.Linear(16, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.embed(ids)))


def logits_numpy(model: Bigram, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].double().numpy()


@pytest.fixture(scope="module")
def model() -> Bigram:
    return Bigram().eval()


@pytest.fixture(scope="module")
def scripted(model: Bigram, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lm") / "teacher.pt"
    with torchscript_allowed():
        torch.jit.script(model).save(str(path))
    return path


@pytest.fixture(scope="module")
def server(model: Bigram) -> Iterator[tuple[str, list[dict[str, object]]]]:
    """vLLM's /v1/completions with prompt_logprobs=1: per prompt token, the token's and the rank-1 token's logprob."""
    seen: list[dict[str, object]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            request = orjson.loads(self.rfile.read(int(self.headers["content-length"])))
            seen.append(request)
            if request.get("model") != "teacher-lm":
                self.send_response(404)
                self.end_headers()
                return
            choices = []
            for index, ids in enumerate(request["prompt"]):
                logits = logits_numpy(model, ids)
                logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
                entries: list[object] = [None]
                for position in range(1, len(ids)):
                    row = logp[position - 1]
                    best = int(row.argmax())
                    entry = {str(ids[position]): {"logprob": float(row[ids[position]]), "rank": int((row > row[ids[position]]).sum()) + 1,
                                                  "decoded_token": f"<{ids[position]}>"}}
                    entry[str(best)] = {"logprob": float(row[best]), "rank": 1, "decoded_token": f"<{best}>"}
                    entries.append(entry)
                choices.append({"index": index, "text": "x", "prompt_logprobs": entries, "finish_reason": "length"})
            choices.reverse()  # the client matches choices by index, not by position
            body = orjson.dumps({"id": "cmpl-1", "object": "text_completion", "model": "teacher-lm", "choices": choices})
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1/completions", seen
    httpd.shutdown()
    httpd.server_close()


ROWS = [{"prompt_tokens": [3, 17, 5], "tokens": [9, 9, 1, 30]}, {"prompt_tokens": [0], "tokens": [39]},
        {"prompt_tokens": list(range(20)), "tokens": [2, 4, 6, 8, 10, 12]}]


def expected(model: Bigram, prompt: list[int], tokens: list[int]) -> tuple[list[float], list[int]]:
    logits = logits_numpy(model, prompt + tokens)
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    rows = logp[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
    return [float(rows[j, t]) for j, t in enumerate(tokens)], rows.argmax(axis=1).tolist()


def test_both_teachers_score_the_students_tokens_as_the_definition_says(model: Bigram, scripted: Path,
                                                                        server: tuple[str, list[dict[str, object]]]) -> None:
    url, seen = server
    local = TorchScriptLanguageModel(scripted).predict(ROWS)
    remote = CompletionsTeacher(url, "teacher-lm").predict(ROWS)
    assert seen[-1]["prompt_logprobs"] == 1 and seen[-1]["max_tokens"] == 1 and len(seen[-1]["prompt"]) == 3  # type: ignore[arg-type]
    for row, a, b in zip(ROWS, local, remote, strict=True):
        logprobs, top1 = expected(model, row["prompt_tokens"], row["tokens"])
        assert a.kind == b.kind == "generation"
        assert a.values["top1"] == b.values["top1"] == top1
        np.testing.assert_allclose(a.values["logprobs"], logprobs, rtol=1e-6)
        np.testing.assert_allclose(b.values["logprobs"], logprobs, rtol=1e-9)


def test_a_bad_answer_or_input_is_a_teacher_error(scripted: Path, server: tuple[str, list[dict[str, object]]]) -> None:
    url, _seen = server
    with pytest.raises(TeacherError, match="HTTP 404"):
        CompletionsTeacher(url, "another-model").predict(ROWS)
    with pytest.raises(TeacherError, match="unreachable"):
        CompletionsTeacher("http://127.0.0.1:9/v1/completions", "teacher-lm", timeout_s=2).predict(ROWS)
    with pytest.raises(TeacherError, match=r"teacher failed on the sequence: .*index out of range"):
        TorchScriptLanguageModel(scripted).predict([{"prompt_tokens": [1], "tokens": [VOCAB + 3]}])
    with pytest.raises(TeacherError, match="prompt"):
        TorchScriptLanguageModel(scripted).predict([{"tokens": [1, 2]}])


def test_the_replayer_turns_generative_predictions_into_valid_generative_replays(server: tuple[str, list[dict[str, object]]]) -> None:
    url, _seen = server
    replayer = Replayer(ReplayerConfig("unused:9092", sample_rate=1.0), CompletionsTeacher(url, "teacher-lm"))
    predictions = []
    for i, row in enumerate(ROWS):
        value = orjson.dumps({"request_id": f"r{i}", "model": "lm", "student_version": "s1", "ts": 1_795_000_000_000,
                              "prompt_tokens": row["prompt_tokens"],
                              "generation": {"tokens": row["tokens"], "logprobs": [-0.5] * len(row["tokens"])}})
        predictions.append(value)
    classifier = orjson.dumps({"request_id": "c", "model": "m", "student_version": "s1", "ts": 1_795_000_000_000,
                               "probs": [0.5, 0.5], "features": {"x": 1.0}})
    no_prompt = orjson.dumps({**orjson.loads(predictions[0]), "request_id": "np", "prompt_tokens": None})
    chosen = [(None, p) for v in [*predictions, classifier, no_prompt] if (p := replayer.select(v)) is not None]
    assert len(chosen) == 3  # the classifier prediction and the one without a prompt are skipped, and counted
    assert replayer.m_skipped.labels("classifier")._value.get() == 1 and replayer.m_skipped.labels("no_prompt")._value.get() == 1
    replays, failures = replayer.replay(chosen)
    assert failures == []
    for (key, value), prediction in zip(replays, predictions, strict=True):
        replay, original = decode_teacher(value), decode_prediction(prediction)
        assert key == original.request_id and replay.generation is not None and original.generation is not None
        assert replay.generation.length == original.generation.length
