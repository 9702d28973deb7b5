"""A real HTTP webhook receiver for tests: verifies Standard Webhooks signatures, de-duplicates by
webhook-id, and answers with a scripted sequence of statuses."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

from kdwatch.slo.webhooks import WebhookVerificationError, verify


@dataclass
class Received:
    secret: str | None = None
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)  # responses to give first
    requests: list[dict[str, Any]] = field(default_factory=list)  # every request, with its verdict
    accepted_ids: list[str] = field(default_factory=list)  # first successful receipt of each webhook-id
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def bodies(self) -> list[Any]:
        return [r["body"] for r in self.requests if r["status"] == 200]


@contextmanager
def webhook_receiver(secret: str | None = None, script: list[tuple[int, dict[str, str]]] | None = None,
                     port: int = 0) -> Iterator[tuple[str, Received]]:
    state = Received(secret, list(script or []))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            with state.lock:
                status, extra = state.script.pop(0) if state.script else (200, {})
                verdict = "ok"
                if state.secret is not None:
                    try:
                        verify(state.secret, headers, body)
                    except WebhookVerificationError as exc:
                        status, verdict = 401, str(exc)
                msg_id = headers.get("webhook-id", "")
                if status == 200 and msg_id not in state.accepted_ids:
                    state.accepted_ids.append(msg_id)
                state.requests.append({"id": msg_id, "status": status, "verdict": verdict, "body": orjson.loads(body),
                                       "headers": headers})
            self.send_response(status)
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass  # keep the test output clean

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
