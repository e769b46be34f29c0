"""Fixtures for LLM-backed code: the real llama.cpp server on the default model, and a scriptable fault server.

- `llm_server` (session): `monoscope.interp.llm.LocalServer` running SmolLM2 (xllamacpp) on 127.0.0.1;
  `llm_server.url` is the OpenAI API root for `open_llm("openai:NAME", endpoint=llm_server.url)`. Skips
  when xllamacpp or the default GGUF is missing. Keep generations short: 2 shared cores.
- `fault_server` (per test): a `FaultServer`, OpenAI-compatible, answering "echo: <last user message>"
  unless told otherwise with `script(...)`; it counts requests and the most it had in flight at once.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from monoscope.interp.llm import LocalServer

# One action per request, in order; "ok" once the script is used up.
ACTIONS = ("ok", "500", "503", "429", "400", "401", "hang", "garbage", "nochoices", "error")


class FaultServer:
    """`/v1/chat/completions` whose next answers follow `script(...)`.

    Actions: ok (200, echo), 500/503/400/401 (an OpenAI-shaped error), 429 (with `Retry-After:
    retry_after`), hang (sleep `hang_s`, then ok: for client timeouts), garbage (200, body not JSON),
    nochoices (200, JSON without `choices`), error (200, JSON `{"error": ...}` only). Each ok answer
    waits `delay_s` first, so concurrent requests overlap and `max_active` shows the client's bound.
    """

    def __init__(self) -> None:
        self._queue: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()
        self.requests = 0
        self.active = 0
        self.max_active = 0
        self.bodies: list[dict[str, Any]] = []
        self.delay_s = 0.0
        self.hang_s = 5.0
        self.retry_after: float | str = 0.2
        self.logprobs: list[dict[str, float]] | None = None  # top candidates for the first token, when asked
        server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        server.daemon_threads = True
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def script(self, *actions: str) -> FaultServer:
        for a in actions:
            assert a in ACTIONS, a
        with self._lock:
            self._queue.extend(actions)
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _next(self, body: dict[str, Any]) -> str:
        with self._lock:
            self.requests += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.bodies.append(body)
            return self._queue.popleft() if self._queue else "ok"

    def _done(self) -> None:
        with self._lock:
            self.active -= 1

    def _reply(self, body: dict[str, Any]) -> dict[str, Any]:
        msgs = body.get("messages") or [{}]
        text = f"echo: {msgs[-1].get('content', '')}"
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": text}}
        if body.get("logprobs"):
            top = self.logprobs or [{"Yes": -0.1, "No": -2.4}]
            choice["logprobs"] = {"content": [
                {"token": max(d, key=d.get), "logprob": max(d.values()),  # type: ignore[arg-type]
                 "top_logprobs": [{"token": t, "logprob": v} for t, v in d.items()]} for d in top]}
        return {"id": "x", "object": "chat.completion", "model": body.get("model"), "choices": [choice],
                "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fs = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {}
                action = fs._next(body)
                try:
                    self._act(action, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout): expected in hang tests
                finally:
                    fs._done()

            def _act(self, action: str, body: dict[str, Any]) -> None:
                if action in ("500", "503", "400", "401", "429"):
                    err = json.dumps({"error": {"message": f"scripted {action}", "type": "test"}}).encode()
                    headers = {"Retry-After": str(fs.retry_after)} if action == "429" else None
                    self._send(int(action), err, headers)
                elif action == "garbage":
                    self._send(200, b"<html>502 bad gateway, upstream said hello</html>")
                elif action == "nochoices":
                    self._send(200, json.dumps({"id": "x", "object": "chat.completion"}).encode())
                elif action == "error":
                    self._send(200, json.dumps({"error": {"message": "model overloaded"}}).encode())
                else:
                    time.sleep(fs.hang_s if action == "hang" else fs.delay_s)
                    self._send(200, json.dumps(fs._reply(body)).encode())

        return Handler


@pytest.fixture
def fault_server() -> Iterator[FaultServer]:
    fs = FaultServer()
    yield fs
    fs.close()


@pytest.fixture(scope="session")
def llm_server() -> Iterator[LocalServer]:
    # xllamacpp is a dependency and `make test` installs the default GGUF: a missing one is a failure
    from monoscope.model.load import default_gguf_path

    gguf = default_gguf_path()
    server = LocalServer(gguf, n_ctx=4096, n_parallel=2, n_threads=1)  # 1 thread: the cores are shared
    yield server
    server.close()
