"""A real OpenAI-compatible HTTP server on 127.0.0.1 that plays a scripted queue of answers.

Tests point the real `openai` client at it, so retries, timeouts and JSON handling run through
the same code paths as against a production endpoint. It serves `/v1/chat/completions` and the
text `/v1/completions` (guard models are prompted in their own format through it). Each request pops the next scripted
answer (FIFO); when the queue is empty a `responder(body)` callable answers, so concurrent
tests can answer by content instead of by arrival order. Every request is recorded.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Text:
    """A normal chat completion whose message content is `content` (after `delay_s`)."""

    content: str
    delay_s: float = 0.0
    finish_reason: str = "stop"
    # Echo what the client sent, as careless servers do in normal replies: "{authorization}"
    # and "{path}" (with its query string) in `content` become the request's header and path.
    echo: bool = False


@dataclass(frozen=True)
class Status:
    """An HTTP error status with an OpenAI-style error body (500, 429, 400, ...).

    `echo_headers` makes the body repeat the request's headers, Authorization included, as
    careless servers and proxies do: a client must not print or log that text as received.
    """

    code: int
    message: str = "scripted error"
    retry_after: float | None = None
    echo_headers: bool = False


@dataclass(frozen=True)
class Raw:
    """A 200 response whose body is `body` verbatim (e.g. malformed JSON)."""

    body: str
    content_type: str = "application/json"


@dataclass(frozen=True)
class ToolCalls:
    """A chat completion whose message asks for tool calls: (name, arguments) pairs; arguments
    given as a dict are sent as JSON, a string is sent verbatim (to script malformed ones)."""

    calls: tuple[tuple[str, dict[str, Any] | str], ...]
    content: str = ""


Answer = Text | Status | Raw | ToolCalls


@dataclass
class RecordedRequest:
    path: str
    body: dict[str, Any] | None
    headers: dict[str, str]
    answer: str  # what the server answered: "text", "status:500", "raw", "unscripted"
    started: float
    finished: float = 0.0

    @property
    def messages(self) -> list[dict[str, Any]]:
        return (self.body or {}).get("messages", [])

    @property
    def prompt(self) -> str:
        """The raw prompt of a text completion request ("" for chat requests)."""
        value = (self.body or {}).get("prompt", "")
        return value if isinstance(value, str) else ""

    @property
    def last_user(self) -> str:
        users = [m["content"] for m in self.messages if m.get("role") == "user"]
        return users[-1] if users else ""


@dataclass
class ScriptedOpenAIServer:
    responder: Callable[[dict[str, Any]], Answer] | None = None
    model: str = "scripted-model"
    queue: deque[Answer] = field(default_factory=deque)
    requests: list[RecordedRequest] = field(default_factory=list)
    in_flight: int = 0
    peak_in_flight: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- script -------------------------------------------------------------------------------

    def push(self, *answers: Answer | str) -> None:
        with self._lock:
            for a in answers:
                self.queue.append(Text(a) if isinstance(a, str) else a)

    def reset(self) -> None:
        with self._lock:
            self.queue.clear()
            self.requests.clear()
            self.responder = None
            self.in_flight = self.peak_in_flight = 0

    def _next_answer(self, body: dict[str, Any] | None) -> Answer | None:
        with self._lock:
            if self.queue:
                return self.queue.popleft()
            responder = self.responder
        return responder(body or {}) if responder is not None else None

    # ---- lifecycle ----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> "ScriptedOpenAIServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                server._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "ScriptedOpenAIServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- request handling -----------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            body = None
        rec = RecordedRequest(path=h.path, body=body, headers={k.lower(): v for k, v in h.headers.items()},
                              answer="", started=time.monotonic())
        with self._lock:
            self.requests.append(rec)
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            route = h.path.rstrip("/")
            if route not in ("/v1/chat/completions", "/v1/completions"):
                rec.answer = "status:404"
                self._send_json(h, 404, {"error": {"message": f"no route {h.path}", "type": "not_found"}})
                return
            answer = self._next_answer(body)
            if answer is None:
                # 400 is not retried by clients, so a test that under-scripts fails at once.
                rec.answer = "unscripted"
                self._send_json(h, 400, {"error": {"message": "script exhausted", "type": "invalid_request_error"}})
            elif isinstance(answer, Status):
                rec.answer = f"status:{answer.code}"
                headers = {"retry-after": str(answer.retry_after)} if answer.retry_after is not None else {}
                error: dict[str, Any] = {"message": answer.message, "type": "scripted"}
                if answer.echo_headers:
                    error["message"] += f" (you sent Authorization: {h.headers.get('Authorization')})"
                    error["request_headers"] = dict(h.headers.items())
                self._send_json(h, answer.code, {"error": error}, headers)
            elif isinstance(answer, Raw):
                rec.answer = "raw"
                self._send(h, 200, answer.body.encode(), answer.content_type)
            elif isinstance(answer, ToolCalls):
                rec.answer = "tool_calls"
                self._send_json(h, 200, self._completion(body or {}, answer))
            else:
                rec.answer = "text"
                if answer.echo:
                    answer = Text(answer.content.replace("{authorization}",
                                                         h.headers.get("Authorization") or "")
                                  .replace("{path}", h.path), answer.delay_s,
                                  answer.finish_reason)
                if answer.delay_s:
                    time.sleep(answer.delay_s)
                if route == "/v1/completions":
                    self._send_json(h, 200, self._text_completion(body or {}, answer))
                else:
                    self._send_json(h, 200, self._completion(body or {}, answer))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test); nothing to answer
        finally:
            rec.finished = time.monotonic()
            with self._lock:
                self.in_flight -= 1

    def _completion(self, body: dict[str, Any], answer: Text | ToolCalls) -> dict[str, Any]:
        n = len(self.requests)
        if isinstance(answer, ToolCalls):
            message: dict[str, Any] = {"role": "assistant", "content": answer.content or None,
                                       "tool_calls": [
                {"id": f"call_{n}_{i}", "type": "function",
                 "function": {"name": name,
                              "arguments": args if isinstance(args, str) else json.dumps(args)}}
                for i, (name, args) in enumerate(answer.calls)]}
            return {"id": f"chatcmpl-scripted-{n}", "object": "chat.completion",
                    "created": int(time.time()), "model": body.get("model", self.model),
                    "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls",
                                 "logprobs": None}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        return {
            "id": f"chatcmpl-scripted-{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": answer.content},
                "finish_reason": answer.finish_reason,
                "logprobs": None,
            }],
            # Whitespace words stand in for tokens, so usage grows with what was sent.
            "usage": {"prompt_tokens": self._words(body), "completion_tokens": max(1, len(answer.content.split())),
                      "total_tokens": self._words(body) + max(1, len(answer.content.split()))},
        }

    @staticmethod
    def _words(body: dict[str, Any]) -> int:
        texts = [m.get("content") or "" for m in body.get("messages", []) if isinstance(m, dict)]
        return max(1, sum(len(str(t).split()) for t in texts))

    def _text_completion(self, body: dict[str, Any], answer: Text) -> dict[str, Any]:
        n = len(self.requests)
        prompt = body.get("prompt", "")
        return {"id": f"cmpl-scripted-{n}", "object": "text_completion", "created": int(time.time()),
                "model": body.get("model", self.model),
                "choices": [{"index": 0, "text": answer.content, "finish_reason": answer.finish_reason,
                             "logprobs": None}],
                "usage": {"prompt_tokens": max(1, len(str(prompt).split())),
                          "completion_tokens": max(1, len(answer.content.split())),
                          "total_tokens": max(1, len(str(prompt).split()))
                          + max(1, len(answer.content.split()))}}

    @staticmethod
    def _send_json(h: BaseHTTPRequestHandler, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        ScriptedOpenAIServer._send(h, code, json.dumps(obj).encode(), "application/json", headers)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, code: int, data: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        h.send_response(code)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)
        h.wfile.flush()
