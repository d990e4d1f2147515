"""Inference over any OpenAI-compatible endpoint (vLLM server, llama.cpp, TGI, a hosted API).

Requests run on a bounded thread pool (`endpoint.concurrency`), each with the endpoint's
timeout and `mosaic.llm`'s observable retries; replies come back in input order whatever order
the requests finish in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mosaic.config import EndpointConfig
from mosaic.llm import RetryingCaller, chat_completion, describe, make_client, map_concurrently
from mosaic.training.inference import Conversation

if TYPE_CHECKING:
    import openai


class OpenAIBackend:
    """`InferenceBackend` over the chat completions API; greedy (temperature 0) by default."""

    name = "openai"

    def __init__(self, endpoint: EndpointConfig, *, client: "openai.OpenAI | None" = None,
                 backoff_s: float = 0.5, backoff_max_s: float = 8.0) -> None:
        self.endpoint = endpoint
        self.client = client if client is not None else make_client(endpoint, max_retries=0)
        self.caller = RetryingCaller(endpoint, backoff_s=backoff_s, backoff_max_s=backoff_max_s)

    @property
    def stats(self) -> dict[str, Any]:
        return self.caller.stats.as_dict()

    def identity(self) -> dict[str, Any]:
        """What determines the outputs, for cache keys (no key, no timeouts)."""
        return {"backend": self.name, "base_url": self.endpoint.base_url, "model": self.endpoint.model}

    def generate(self, conversations: Sequence[Conversation], *, max_new_tokens: int,
                 temperature: float = 0.0) -> list[str]:
        for i, conv in enumerate(conversations):
            if not conv or conv[-1].get("role") != "user":
                raise ValueError(f"conversation {i} must end with a user turn to be answered; "
                                 f"it ends with {conv[-1].get('role') if conv else 'nothing'!r}")

        def one(i: int) -> str:
            return self.caller(
                lambda: chat_completion(self.client, self.endpoint.model, conversations[i],
                                        max_tokens=max_new_tokens, temperature=temperature),
                what=f"generation {i + 1}/{len(conversations)}")

        # In order, so replies line up with conversations; the first exhausted request
        # re-raises (EndpointError naming the endpoint, never the key) and the requests queued
        # behind it are not sent.
        return map_concurrently(one, len(conversations), self.endpoint.concurrency, "mosaic-openai")

    def __repr__(self) -> str:
        return f"OpenAIBackend({describe(self.endpoint)}, concurrency={self.endpoint.concurrency})"
