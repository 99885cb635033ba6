"""A loopback OpenAI-compatible stub that misbehaves on demand (429, 500, stall, garbage, 401).

Only for the faults a real llama.cpp server will not produce when asked; everything else in the
generation tests runs against a real server. stdlib only: `http.server` on 127.0.0.1, a free port.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# A well-formed answer: queries share words ("widgets", "gears") with the test passages.
GOOD_ANSWER = " how are widgets made from gears\n2. what holds widgets together\n3. widgets and gears in machines"
GARBAGE_ANSWER = " ### @@@ 123 !!!\n--- ??? 42"


class FaultStub:
    """Serves /v1/completions and /v1/chat/completions; each request takes the next action of `script`.

    Actions: "ok", "429" (with Retry-After: 0), "500", "401", "stall" (sleep `stall_s`, then answer ok),
    "garbage" (200 with no usable query), "html" (200 with an HTML page, not an OpenAI body).
    When the script runs out, `default` applies.
    `requests` lists the JSON bodies received, in order (the server-side count); `auth` their
    Authorization headers.
    """

    def __init__(self, script: list[str] | None = None, default: str = "ok", stall_s: float = 3.0) -> None:
        self.script = list(script or [])
        self.default = default
        self.stall_s = stall_s
        self.requests: list[dict] = []
        self.auth: list[str] = []
        self._lock = threading.Lock()

    def next_action(self, body: dict, auth: str) -> str:
        with self._lock:
            self.requests.append(body)
            self.auth.append(auth)
            return self.script.pop(0) if self.script else self.default

    def handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
                blob = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(blob)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                try:
                    self.wfile.write(blob)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (stall test)
                    pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                action = stub.next_action(body, self.headers.get("Authorization", ""))
                if action in ("429", "500", "401"):
                    headers = {"Retry-After": "0"} if action == "429" else None
                    self._send(int(action), {"error": {"message": f"stub {action}", "type": "stub"}}, headers)
                    return
                if action == "html":
                    page = b"<html><body>Service temporarily unavailable</body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return
                if action == "stall":
                    time.sleep(stub.stall_s)
                text = GARBAGE_ANSWER if action == "garbage" else GOOD_ANSWER
                usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
                if self.path.endswith("/chat/completions"):
                    choice = {"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": "1." + text}}
                    self._send(200, {"id": "stub", "object": "chat.completion", "created": 0,
                                     "model": body.get("model", ""), "choices": [choice], "usage": usage})
                else:
                    choice = {"index": 0, "finish_reason": "stop", "text": text, "logprobs": None}
                    self._send(200, {"id": "stub", "object": "text_completion", "created": 0,
                                     "model": body.get("model", ""), "choices": [choice], "usage": usage})

        return Handler


@contextmanager
def fault_stub(script: list[str] | None = None, default: str = "ok", stall_s: float = 3.0) -> Iterator[tuple[str, FaultStub]]:
    """Run a FaultStub on a free loopback port; yield (base URL ending in /v1, stub)."""
    stub = FaultStub(script, default, stall_s)
    server = ThreadingHTTPServer(("127.0.0.1", 0), stub.handler())
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", stub
    finally:
        server.shutdown()
        server.server_close()
