"""A loopback OpenAI-compatible stub that misbehaves on demand (429, 500, stall, garbage, bad JSON, 401, dying).

Only for the faults a real llama.cpp server will not produce when asked; everything else in the
generation tests runs against a real server. stdlib only: `http.server` on 127.0.0.1, a free port.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# A well-formed answer: queries share words ("widgets", "gears") with the test passages.
GOOD_ANSWER = " how are widgets made from gears\n2. what holds widgets together\n3. widgets and gears in machines"
GARBAGE_ANSWER = " ### @@@ 123 !!!\n--- ??? 42"


def echo_answer(body: dict) -> str:
    """A well-formed answer for any passage: three queries made of the passage's own words (so they parse)."""
    sent = body.get("prompt") or "".join(m.get("content", "") for m in body.get("messages", []))
    passage = sent.rsplit("Passage:", 1)[-1].split("\n", 1)[0]
    words = re.findall(r"[A-Za-z]{4,}", passage) or ["widgets", "gears"]
    words = (words * 12)[:12]
    return " " + "\n".join(f"{i}. {' '.join(words[4 * (i - 1):4 * i])}" for i in (1, 2, 3)).removeprefix("1. ")


class FaultStub:
    """Serves /v1/completions and /v1/chat/completions; each request takes the next action of `script`.

    Actions: "ok", "429" (no Retry-After), "429:N" (Retry-After: N), "500", "401", "stall" (sleep
    `stall_s`, then answer ok), "garbage" (200 with no usable query), "html" (200 with an HTML page,
    not an OpenAI body), "badjson" (200, application/json, a body that is not JSON).
    When the script runs out, `default` applies. "ok" answers wait `delay_s` first; with `echo` they
    are made of the passage's own words (`echo_answer`: usable for any real passage), else GOOD_ANSWER.
    GET /v1/models (the client's health check) answers per `health`: "ok", "stall" or "404".
    key: when set, a request with another Bearer key gets 401 whose message echoes the key sent
        (as OpenAI's does), so tests can check the client never repeats it.
    die_after: after answering that many POSTs the server stops listening (the endpoint dies).
    `requests` lists the JSON bodies received, in order (the server-side count); `auth` their
    Authorization headers; `times` their arrival (time.monotonic); `health_checks` the GETs;
    `answered_ok` the usable answers delivered in full (what a client could have stored).
    """

    def __init__(self, script: list[str] | None = None, default: str = "ok", stall_s: float = 3.0,
                 delay_s: float = 0.0, health: str = "ok", key: str | None = None,
                 die_after: int | None = None, echo: bool = False) -> None:
        self.script = list(script or [])
        self.default = default
        self.stall_s = stall_s
        self.delay_s = delay_s
        self.health = health
        self.key = key
        self.die_after = die_after
        self.echo = echo
        self.requests: list[dict] = []
        self.auth: list[str] = []
        self.times: list[float] = []
        self.health_checks = 0
        self.answered_ok = 0
        self.server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    def next_action(self, body: dict, auth: str) -> str:
        with self._lock:
            self.requests.append(body)
            self.auth.append(auth)
            self.times.append(time.monotonic())
            if self.key is not None and auth != f"Bearer {self.key}":
                return "401"
            return self.script.pop(0) if self.script else self.default

    def die(self) -> None:
        """Stop listening: later connections are refused (requests in progress still finish)."""
        if self.server is not None:
            threading.Thread(target=self._close, daemon=True).start()

    def _close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> bool:
                return self._send_bytes(status, json.dumps(payload).encode(), "application/json", headers)

            def _send_bytes(self, status: int, blob: bytes, content_type: str,
                            headers: dict[str, str] | None = None) -> bool:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(blob)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                try:
                    self.wfile.write(blob)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (stall test)
                    return False
                return True

            def do_GET(self) -> None:
                with stub._lock:
                    stub.health_checks += 1
                auth = self.headers.get("Authorization", "")
                if stub.key is not None and auth != f"Bearer {stub.key}":
                    self._send(401, {"error": {"message": f"Incorrect API key provided: {auth[7:]}"}})
                elif stub.health == "stall":
                    time.sleep(stub.stall_s)
                    self._send(200, {"object": "list", "data": []})
                elif stub.health == "404":
                    self._send(404, {"error": {"message": "no such route"}})
                else:
                    self._send(200, {"object": "list", "data": [{"id": "stub-model", "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                auth = self.headers.get("Authorization", "")
                action = stub.next_action(body, auth)
                try:
                    self._answer(action, body, auth)
                finally:
                    if stub.die_after is not None and len(stub.requests) >= stub.die_after:
                        stub.die()

            def _answer(self, action: str, body: dict, auth: str) -> None:
                if action == "401":
                    self._send(401, {"error": {"message": f"Incorrect API key provided: {auth[7:]}", "type": "stub"}})
                    return
                if action.split(":")[0] in ("429", "500"):
                    status, _, wait = action.partition(":")
                    headers = {"Retry-After": wait} if wait else None
                    self._send(int(status), {"error": {"message": f"stub {status}", "type": "stub"}}, headers)
                    return
                if action == "badjson":
                    self._send_bytes(200, b'{"id": "stub", "choices": [{"text": "1. widgets', "application/json")
                    return
                if action == "html":
                    self._send_bytes(200, b"<html><body>Service temporarily unavailable</body></html>", "text/html")
                    return
                if action == "stall":
                    time.sleep(stub.stall_s)
                elif stub.delay_s:
                    time.sleep(stub.delay_s)
                text = GARBAGE_ANSWER if action == "garbage" else echo_answer(body) if stub.echo else GOOD_ANSWER
                usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
                if self.path.endswith("/chat/completions"):
                    choice = {"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": "1." + text}}
                    sent = self._send(200, {"id": "stub", "object": "chat.completion", "created": 0,
                                            "model": body.get("model", ""), "choices": [choice], "usage": usage})
                else:
                    choice = {"index": 0, "finish_reason": "stop", "text": text, "logprobs": None}
                    sent = self._send(200, {"id": "stub", "object": "text_completion", "created": 0,
                                            "model": body.get("model", ""), "choices": [choice], "usage": usage})
                if sent and action != "garbage":
                    with stub._lock:
                        stub.answered_ok += 1

        return Handler


@contextmanager
def fault_stub(script: list[str] | None = None, default: str = "ok", stall_s: float = 3.0,
               **options: Any) -> Iterator[tuple[str, FaultStub]]:
    """Run a FaultStub on a free loopback port; yield (base URL ending in /v1, stub). `options`: see FaultStub."""
    stub = FaultStub(script, default, stall_s, **options)
    server = ThreadingHTTPServer(("127.0.0.1", 0), stub.handler())
    server.daemon_threads = True
    stub.server = server
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", stub
    finally:
        server.shutdown()  # returns at once when the stub already died
        server.server_close()
