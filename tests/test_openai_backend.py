"""The OpenAI-compatible backend against a real local HTTP server with the real `openai` client."""

from __future__ import annotations

import logging
import time

import pytest
from openai_server import Raw, Status, Text

from mosaic.config import EndpointConfig
from mosaic.llm import EndpointError, RetryingCaller
from mosaic.training.inference import InferenceBackend, replay
from mosaic.training.openai_backend import OpenAIBackend

SECRET = "sk-test-never-log-this-0123456789"


def endpoint(server, **kw) -> EndpointConfig:
    defaults = dict(base_url=server.base_url, model="tiny-chat", api_key_env="MOSAIC_TEST_KEY",
                    timeout_s=5.0, max_retries=2, concurrency=4)
    return EndpointConfig(**{**defaults, **kw})


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("MOSAIC_TEST_KEY", SECRET)


def test_implements_interface_and_sends_greedy_bounded_requests(openai_server):
    backend = OpenAIBackend(endpoint(openai_server), backoff_s=0.01)
    assert isinstance(backend, InferenceBackend)
    openai_server.push("hello there")
    out = backend.generate([[{"role": "user", "content": "hi"}]], max_new_tokens=7)
    assert out == ["hello there"]
    (req,) = openai_server.requests
    assert req.body["model"] == "tiny-chat"
    assert req.body["temperature"] == 0.0
    assert req.body["max_tokens"] == 7
    assert req.body["messages"] == [{"role": "user", "content": "hi"}]
    assert req.headers["authorization"] == f"Bearer {SECRET}"  # the key reaches the server only


def test_order_preserved_under_concurrency(openai_server):
    n = 12

    def responder(body):
        i = int(body["messages"][-1]["content"].split()[-1])
        # Early prompts answer slowest, so completion order is the reverse of input order.
        return Text(f"answer {i}", delay_s=0.02 * (n - i))

    openai_server.responder = responder
    backend = OpenAIBackend(endpoint(openai_server, concurrency=4), backoff_s=0.01)
    convs = [[{"role": "user", "content": f"question {i}"}] for i in range(n)]
    out = backend.generate(convs, max_new_tokens=8)
    assert out == [f"answer {i}" for i in range(n)]
    assert openai_server.peak_in_flight == 4  # bounded by the configured concurrency, and used
    finish_order = [int(r.last_user.split()[-1]) for r in sorted(openai_server.requests, key=lambda r: r.finished)]
    assert finish_order != sorted(finish_order)  # requests really did finish out of order


def test_retries_a_500_and_a_429_then_succeeds(openai_server, caplog):
    openai_server.push(Status(500, "overloaded"), Status(429, "slow down", retry_after=0.01), "ok now")
    backend = OpenAIBackend(endpoint(openai_server, concurrency=1, max_retries=3), backoff_s=0.01)
    with caplog.at_level(logging.WARNING, logger="mosaic.llm"):
        out = backend.generate([[{"role": "user", "content": "x"}]], max_new_tokens=4)
    assert out == ["ok now"]
    assert [r.answer for r in openai_server.requests] == ["status:500", "status:429", "text"]
    assert backend.stats["retries"] == {"http_500": 1, "http_429": 1}
    assert backend.stats["attempts"] == 3
    assert "attempt 1/4 failed (http_500" in caplog.text
    assert SECRET not in caplog.text


def test_timeout_then_success(openai_server):
    openai_server.push(Text("too late", delay_s=1.5), "in time")
    backend = OpenAIBackend(endpoint(openai_server, concurrency=1, timeout_s=0.4), backoff_s=0.01)
    t0 = time.monotonic()
    out = backend.generate([[{"role": "user", "content": "x"}]], max_new_tokens=4)
    assert out == ["in time"]
    assert time.monotonic() - t0 < 1.4  # the client gave up on the slow answer, it did not wait
    assert len(openai_server.requests) == 2
    assert backend.stats["retries"] == {"timeout": 1}


def test_malformed_body_is_retried(openai_server):
    openai_server.push(Raw("{not json"), Raw("<html>bad gateway</html>", "text/html"), "fine")
    backend = OpenAIBackend(endpoint(openai_server, concurrency=1, max_retries=2), backoff_s=0.01)
    assert backend.generate([[{"role": "user", "content": "x"}]], max_new_tokens=4) == ["fine"]
    assert backend.stats["retries"] == {"malformed_body": 2}


def test_exhausted_retries_raise_a_clear_error_without_the_key(openai_server):
    openai_server.push(*[Status(503, "down")] * 3)
    backend = OpenAIBackend(endpoint(openai_server, concurrency=1, max_retries=2), backoff_s=0.01)
    with pytest.raises(EndpointError) as exc:
        backend.generate([[{"role": "user", "content": "x"}]], max_new_tokens=4)
    msg = str(exc.value)
    assert "failed after 3 attempt(s)" in msg and "http_503" in msg
    assert openai_server.base_url in msg and "tiny-chat" in msg
    assert SECRET not in msg
    assert len(openai_server.requests) == 3
    assert backend.stats["failures"] == {"http_503": 1}


@pytest.mark.parametrize("key", [SECRET, "plain-looking-key-value-42"])
def test_a_server_echoing_the_key_never_gets_it_logged_or_raised(openai_server, caplog,
                                                                  monkeypatch, key):
    """The server repeats the Authorization header in its 500 and 401 bodies; the retry
    warning and the final error carry its message, with the key redacted (the configured
    value whatever it looks like, and anything shaped like a bearer token)."""
    monkeypatch.setenv("MOSAIC_TEST_KEY", key)
    openai_server.push(Status(500, "boom", echo_headers=True), Status(401, "bad key", echo_headers=True))
    backend = OpenAIBackend(endpoint(openai_server, concurrency=1, max_retries=2), backoff_s=0.01)
    with caplog.at_level(logging.WARNING, logger="mosaic.llm"):
        with pytest.raises(EndpointError) as exc:
            backend.generate([[{"role": "user", "content": "x"}]], max_new_tokens=4)
    assert openai_server.requests[0].headers["authorization"] == f"Bearer {key}"  # it was sent
    msg = str(exc.value)
    assert "not retryable" in msg and "bad key" in msg and "Bearer <redacted>" in msg
    assert exc.value.reason == "http_401"
    # Not chained either: a traceback of the EndpointError would print the SDK error's text.
    assert exc.value.__cause__ is None and exc.value.__suppress_context__
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "mosaic.llm"]
    assert "http_500" in warning and "boom" in warning and "<redacted>" in warning
    for text in (msg, warning):
        assert key not in text


def test_redact_hides_keys_in_the_shapes_servers_echo_them():
    from mosaic.redact import REDACTED, looks_secret, redact

    assert redact("Authorization: Bearer abc.def-123") == f"Authorization: Bearer {REDACTED}"
    assert redact("{'authorization': 'Bearer xyz'}") == f"{{'authorization': 'Bearer {REDACTED}'}}"
    assert redact("key sk-proj-AbCdEf0123456789 was rejected") == f"key {REDACTED} was rejected"
    assert redact('{"api_key": "hunter2hunter2"}') == f'{{"api_key": "{REDACTED}"}}'
    assert redact("x-api-key=abcdef") == f"x-api-key={REDACTED}"
    assert redact("the value my-own-key-77 leaked", ["my-own-key-77"]) == f"the value {REDACTED} leaked"
    # Placeholders are not keys: "EMPTY" (local servers) and very short values stay readable.
    assert redact("model EMPTY x", ["EMPTY", "x"]) == "model EMPTY x"
    assert redact("unknown model 'tiny-chat'") == "unknown model 'tiny-chat'"
    assert looks_secret("sk-test-SECRET123") and looks_secret("Bearer abc")
    assert looks_secret("a8F3kL0pQ7zX2mN5vB9cD1eR4tY6uI")  # a long token mixing letters, digits
    assert not looks_secret("runs/sandbox") and not looks_secret(42)
    assert not looks_secret("a_perfectly_ordinary_long_identifier_name")


def test_client_errors_are_not_retried(openai_server):
    openai_server.push(Status(400, "bad request: unknown model"))
    backend = OpenAIBackend(endpoint(openai_server, concurrency=1), backoff_s=0.01)
    with pytest.raises(EndpointError, match="not retryable.*unknown model"):
        backend.generate([[{"role": "user", "content": "x"}]], max_new_tokens=4)
    assert len(openai_server.requests) == 1


def test_backoff_grows_exponentially_and_is_capped():
    caller = RetryingCaller(EndpointConfig(model="m"), backoff_s=1.0, backoff_max_s=5.0)
    delays = [caller.delay(k) for k in range(5)]
    for k, d in enumerate(delays):
        assert 0.5 * min(5.0, 2 ** k) <= d <= min(5.0, 2 ** k)
    assert delays[4] <= 5.0


def test_rejects_a_conversation_that_does_not_end_with_a_user_turn(openai_server):
    backend = OpenAIBackend(endpoint(openai_server))
    with pytest.raises(ValueError, match="conversation 1 must end with a user turn"):
        backend.generate([[{"role": "user", "content": "a"}],
                          [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]],
                         max_new_tokens=4)
    assert openai_server.requests == []


def test_replay_feeds_the_models_own_answers_back(openai_server):
    openai_server.responder = lambda body: Text(f"model says: {body['messages'][-1]['content']}")
    backend = OpenAIBackend(endpoint(openai_server, concurrency=2), backoff_s=0.01)
    convs = replay(backend, [["first", "second"], ["only"]], max_new_tokens=16)
    assert convs[0] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "model says: first"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "model says: second"},
    ]
    assert convs[1][-1] == {"role": "assistant", "content": "model says: only"}
    (second_turn,) = [r for r in openai_server.requests if r.last_user == "second"]
    assert second_turn.messages[1] == {"role": "assistant", "content": "model says: first"}
    assert len(openai_server.requests) == 3
