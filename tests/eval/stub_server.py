"""A local OpenAI-compatible chat-completions stub for endpoint tests (stdlib only).

`StubServer` listens on 127.0.0.1 (port 0 = any free port) in a background thread. It records every request
(path, headers, JSON body), answers deterministically through `responder(body) -> str`, can fail the first
`fail_first` requests (and every request `fail_if(body)` accepts) with `fail_status` (503 by default) to
exercise retries, checks an optional bearer key
(401 with an OpenAI-style error otherwise), and rejects unknown models with a 404 naming the model.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def user_text(body: dict) -> str:
    """The text of the last user message (string content or the concatenated text parts)."""
    content = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content if p["type"] == "text")


def echo_responder(body: dict) -> str:
    return f"echo: {user_text(body)}"


class StubServer:
    def __init__(self, responder: Callable[[dict], str] = echo_responder, *, fail_first: int = 0,
                 fail_status: int = 503, fail_if: Callable[[dict], bool] | None = None, api_key: str | None = None,
                 models: tuple[str, ...] = ("stub-model",)):
        self.responder = responder
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.fail_if = fail_if
        self.api_key = api_key
        self.models = models
        self.requests: list[dict] = []  # every request, failed ones included
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def answered(self) -> list[dict]:
        """Bodies of the requests that got a 200."""
        return [r["body"] for r in self.requests if r["status"] == 200]

    def __enter__(self) -> StubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                with stub._lock:
                    record = {"path": self.path, "headers": dict(self.headers), "body": body, "status": 200}
                    stub.requests.append(record)
                    failing = len(stub.requests) <= stub.fail_first or bool(
                        stub.fail_if and isinstance(body, dict) and stub.fail_if(body))
                    if failing:
                        record["status"] = stub.fail_status
                if failing:
                    return self._send(stub.fail_status, {"error": {"message": "server busy", "type": "overloaded"}})
                if self.path != "/v1/chat/completions":
                    record["status"] = 404
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                if stub.api_key and self.headers.get("Authorization") != f"Bearer {stub.api_key}":
                    record["status"] = 401
                    return self._send(401, {"error": {"message": "invalid API key", "type": "auth"}})
                if not isinstance(body, dict) or body.get("model") not in stub.models:
                    record["status"] = 404
                    model = body.get("model") if isinstance(body, dict) else None
                    return self._send(404, {"error": {"message": f"The model `{model}` does not exist."}})
                text = stub.responder(body)
                self._send(200, {"id": f"chatcmpl-{len(stub.requests)}", "object": "chat.completion",
                                 "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": text}}]})

        return Handler
