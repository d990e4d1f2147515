"""OpenAI-compatible endpoints: the client factory and one observable retry loop for all callers.

The inference backend, the LLM judge and the planner reach endpoints through here, so every
caller retries the same transient failures (timeouts, connection errors, HTTP 429 and 5xx,
unparseable response bodies) with the same exponential backoff, and counts what it did. The
SDK's own retries are switched off for these callers: retries hidden inside the SDK cannot be
counted, logged or tested. API keys are read from the environment when a client is built and
never appear in a log line, an error message or a file.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from mosaic.config import EndpointConfig
from mosaic.redact import redact, redact_url, register_secrets, url_secrets

if TYPE_CHECKING:
    import openai

log = logging.getLogger("mosaic.llm")

T = TypeVar("T")


class EndpointError(RuntimeError):
    """A request to an OpenAI-compatible endpoint failed for good (non-retryable or retries spent).

    The message carries the server's error text with secrets redacted; the SDK exception is not
    chained (its text may echo the key), `reason` names what failed (e.g. "http_401").
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


def endpoint_secrets(endpoint: EndpointConfig) -> tuple[str, ...]:
    """The key value configured for `endpoint` (from its environment variable), if any, and
    the credentials its base URL carries."""
    value = os.environ.get(endpoint.api_key_env)
    return ((value,) if value else ()) + tuple(url_secrets(endpoint.base_url))


def make_client(endpoint: EndpointConfig, *, max_retries: int | None = None,
                timeout_s: float | None = None) -> "openai.OpenAI":
    """An `openai.OpenAI` client for `endpoint`; the key comes from `endpoint.api_key_env`.

    `max_retries` defaults to the endpoint's own setting (SDK retries); callers that retry
    through `RetryingCaller` pass 0 so attempts are not multiplied.
    """
    import openai

    if endpoint.base_url and redact_url(endpoint.base_url) == endpoint.base_url \
            and "***" in endpoint.base_url:
        # Settings saved in a run folder hold URLs with their credentials masked.
        raise EndpointError(f"{endpoint.base_url} has its credentials masked (***): a run folder "
                            f"never keeps them; give the full URL again with the MOSAIC__... "
                            f"override of this endpoint's base_url", "masked_credentials")
    # Whatever this client sends may come back in a reply or an error: from now on the
    # process hides it wherever it prints or writes (mosaic.redact).
    register_secrets(endpoint_secrets(endpoint))
    return openai.OpenAI(
        base_url=endpoint.base_url,
        api_key=endpoint.api_key(),
        timeout=endpoint.timeout_s if timeout_s is None else timeout_s,
        max_retries=endpoint.max_retries if max_retries is None else max_retries,
    )


def describe(endpoint: EndpointConfig) -> str:
    """Where requests go, for messages: base URL and model, never the key."""
    # A key passed in the URL (`?api_key=...`) is hidden like one echoed by the server.
    return redact(f"{endpoint.base_url or 'https://api.openai.com/v1'} (model {endpoint.model})",
                  endpoint_secrets(endpoint))


class MalformedResponse(Exception):
    """The endpoint answered 200 with a body that is not a chat completion."""


def transient_reason(err: BaseException) -> str | None:
    """A short reason code when `err` is worth retrying, else None."""
    import openai

    if isinstance(err, openai.APITimeoutError):
        return "timeout"
    if isinstance(err, openai.APIConnectionError):
        return "connection"
    if isinstance(err, openai.RateLimitError):
        return "http_429"
    if isinstance(err, openai.APIStatusError) and err.status_code >= 500:
        return f"http_{err.status_code}"
    if isinstance(err, (MalformedResponse, json.JSONDecodeError)):
        return "malformed_body"
    return None


def _retry_after(err: BaseException) -> float | None:
    response = getattr(err, "response", None)
    value = getattr(response, "headers", {}).get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff


@dataclass
class RetryStats:
    """What a caller did, thread-safe: requests, attempts, retries and failures by reason."""

    requests: int = 0
    attempts: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def count(self, field_name: str, reason: str | None = None) -> None:
        """Add one to `requests`/`attempts`, or to `retries`/`failures` under `reason`."""
        with self._lock:
            if reason is None:
                setattr(self, field_name, getattr(self, field_name) + 1)
            else:
                getattr(self, field_name)[reason] += 1

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": self.requests, "attempts": self.attempts,
                    "retries": dict(self.retries), "failures": dict(self.failures)}


class RetryingCaller:
    """Runs one endpoint call with bounded retries and exponential backoff with jitter.

    Attempt k (0-based) that fails transiently waits min(backoff_max_s, backoff_s * 2**k) times
    a jitter in [0.5, 1], or the server's Retry-After when it sent one (capped the same way).
    """

    def __init__(self, endpoint: EndpointConfig, *, max_retries: int | None = None,
                 backoff_s: float = 0.5, backoff_max_s: float = 8.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.endpoint = endpoint
        self.max_retries = endpoint.max_retries if max_retries is None else max_retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.sleep = sleep
        self.stats = RetryStats()
        self._rng = random.Random(0)

    def delay(self, attempt: int, err: BaseException | None = None) -> float:
        hinted = _retry_after(err) if err is not None else None
        if hinted is not None:
            return min(self.backoff_max_s, max(0.0, hinted))
        return min(self.backoff_max_s, self.backoff_s * 2 ** attempt) * self._rng.uniform(0.5, 1.0)

    def __call__(self, fn: Callable[[], T], *, what: str = "request") -> T:
        self.stats.count("requests")
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            self.stats.count("attempts")
            try:
                return fn()
            except Exception as err:  # noqa: BLE001 (classified right below)
                reason = transient_reason(err)
                # The server's text may echo the Authorization header: redact before it is
                # logged or raised, and do not chain the SDK error (a traceback would print it).
                text = _short(err, secrets=endpoint_secrets(self.endpoint))
                if reason is None:
                    failed = _reason_of(err)
                    self.stats.count("failures", failed)
                    raise EndpointError(f"{what} to {describe(self.endpoint)} failed and is not "
                                        f"retryable: {text}", failed) from None
                if attempt + 1 >= attempts:
                    self.stats.count("failures", reason)
                    raise EndpointError(
                        f"{what} to {describe(self.endpoint)} failed after {attempts} attempt(s); "
                        f"last error ({reason}): {text}. Check that the server is up and "
                        f"answering within timeout_s={self.endpoint.timeout_s}, or raise "
                        f"max_retries={self.max_retries}.", reason) from None
                wait = self.delay(attempt, err)
                self.stats.count("retries", reason)
                log.warning("%s to %s: attempt %d/%d failed (%s: %s); retrying in %.2fs", what,
                            describe(self.endpoint), attempt + 1, attempts, reason, text, wait)
                self.sleep(wait)
        raise AssertionError("unreachable")


def map_concurrently(fn: Callable[[int], T], n: int, workers: int, name: str) -> list[T]:
    """`[fn(0), ..., fn(n - 1)]` with at most `workers` calls in flight (one endpoint's
    `concurrency`), results in order. The first exception re-raises here, and the calls still
    queued behind it are not started."""
    if n == 0:
        return []
    pool = ThreadPoolExecutor(max_workers=min(workers, n), thread_name_prefix=name)
    try:
        futures = [pool.submit(fn, i) for i in range(n)]
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _reason_of(err: BaseException) -> str:
    code = getattr(err, "status_code", None)
    return f"http_{code}" if code is not None else type(err).__name__


def _short(err: BaseException, limit: int = 300, secrets: Iterable[str] = ()) -> str:
    # Redact before cutting: a cut could leave a prefix of the key that no longer matches.
    text = redact(str(err) or type(err).__name__, secrets)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class TokenUsage:
    """Tokens an endpoint reported for the requests a caller made (thread-safe), and what they
    cost at the endpoint's configured price. Requests whose response carried no `usage` are
    counted apart: their tokens are unknown, not zero."""

    responses: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    without_usage: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, response: Any) -> None:
        usage = getattr(response, "usage", None)
        p = getattr(usage, "prompt_tokens", None)
        c = getattr(usage, "completion_tokens", None)
        with self._lock:
            self.responses += 1
            if isinstance(p, int) and isinstance(c, int):
                self.prompt_tokens += p
                self.completion_tokens += c
            else:
                self.without_usage += 1

    def cost(self, endpoint: EndpointConfig) -> float | None:
        """Estimated cost from the endpoint's price per 1k tokens; None when no price is set."""
        if endpoint.price_per_1k_input is None and endpoint.price_per_1k_output is None:
            return None
        with self._lock:
            return (self.prompt_tokens / 1000 * (endpoint.price_per_1k_input or 0.0)
                    + self.completion_tokens / 1000 * (endpoint.price_per_1k_output or 0.0))

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {"responses": self.responses, "tokens_in": self.prompt_tokens,
                    "tokens_out": self.completion_tokens, "without_usage": self.without_usage}


def chat_completion(client: "openai.OpenAI", model: str, messages: Sequence[dict[str, str]], *,
                    max_tokens: int | None = None, temperature: float = 0.0,
                    usage: TokenUsage | None = None, **extra: Any) -> str:
    """One chat completion's message text; a body that is not a completion raises
    `MalformedResponse` (retryable) instead of an AttributeError deep in the caller. `usage`
    accumulates the tokens the server reports."""
    kwargs: dict[str, Any] = {"model": model, "messages": list(messages), "temperature": temperature}
    if max_tokens is not None:
        # `max_tokens`, not `max_completion_tokens`: vLLM, llama.cpp and TGI all accept it.
        kwargs["max_tokens"] = max_tokens
    response = client.chat.completions.create(**kwargs, **extra)
    choices = getattr(response, "choices", None)
    if not choices:
        raise MalformedResponse(f"response has no choices: {str(response)[:200]!r}")
    message = getattr(choices[0], "message", None)
    if message is None:
        raise MalformedResponse(f"first choice has no message: {str(choices[0])[:200]!r}")
    if usage is not None:
        usage.add(response)
    # A server may echo the key in a normal 200 reply: redacted before anyone stores it.
    return redact(message.content or "")


def text_completion(client: "openai.OpenAI", model: str, prompt: str, *, max_tokens: int,
                    temperature: float = 0.0, usage: TokenUsage | None = None,
                    **extra: Any) -> str:
    """One (legacy) text completion over a raw prompt, `/v1/completions`: classifiers such as
    guard models are prompted in their own trained format, which a chat template would wrap
    again. Checked like `chat_completion`."""
    response = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                         temperature=temperature, **extra)
    choices = getattr(response, "choices", None)
    if not choices:
        raise MalformedResponse(f"response has no choices: {str(response)[:200]!r}")
    text = getattr(choices[0], "text", None)
    if not isinstance(text, str):
        raise MalformedResponse(f"first choice has no text: {str(choices[0])[:200]!r}")
    if usage is not None:
        usage.add(response)
    return redact(text)


def chat_message(client: "openai.OpenAI", model: str, messages: Sequence[dict[str, Any]], *,
                 temperature: float = 0.0, **extra: Any) -> Any:
    """One chat completion's first message (content and tool calls), checked like
    `chat_completion`: a body that is not a completion raises `MalformedResponse`."""
    response = client.chat.completions.create(model=model, messages=list(messages),
                                              temperature=temperature, **extra)
    choices = getattr(response, "choices", None)
    if not choices or getattr(choices[0], "message", None) is None:
        raise MalformedResponse(f"response has no message: {str(response)[:200]!r}")
    message = choices[0].message
    # Redacted like `chat_completion`'s text: the content and every tool call's arguments.
    if isinstance(message.content, str):
        message.content = redact(message.content)
    for call in getattr(message, "tool_calls", None) or ():
        function = getattr(call, "function", None)
        if function is not None and isinstance(function.arguments, str):
            function.arguments = redact(function.arguments)
    return message


def response_format(endpoint: EndpointConfig, name: str, schema: dict[str, Any]
                    ) -> dict[str, Any]:
    """Request options asking `endpoint` to constrain a reply to the JSON `schema`, in the
    dialect its config names (`response_format`); {} when it asks in the prompt only. The reply
    is still parsed and checked by the caller: a server may ignore the request."""
    if endpoint.response_format == "json_schema":
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": name, "schema": schema}}}
    if endpoint.response_format == "json_object_schema":
        return {"response_format": {"type": "json_object", "schema": schema}}
    return {}
