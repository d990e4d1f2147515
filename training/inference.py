"""The inference interface every backend implements, and multi-turn replay over it.

A backend answers a batch of conversations with one assistant turn each. Replay drives a
multi-turn eval set turn by turn: every user turn is answered by the model itself, and the next
user turn sees the model's own earlier answers (never the dataset's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, Protocol, runtime_checkable

Conversation = list[dict[str, str]]  # [{"role": ..., "content": ...}, ...]


@runtime_checkable
class InferenceBackend(Protocol):
    """Answers conversations; implementations: transformers (default), OpenAI-compatible, vLLM."""

    name: str

    def generate(self, conversations: Sequence[Conversation], *, max_new_tokens: int,
                 temperature: float = 0.0) -> list[str]:
        """One assistant reply per conversation, in order. Greedy when temperature == 0."""
        ...


def prompt_ids(tokenizer: Any, conversations: Sequence[Conversation], *, max_new_tokens: int,
               max_positions: int | None) -> tuple[list[list[int]], int]:
    """Chat-formatted prompt token ids (ending with the assistant header) as every local
    backend feeds them to its model, and how many were cut: a prompt longer than
    `max_positions - max_new_tokens` keeps its end (the latest turns and the header the answer
    follows). The transformers and vLLM backends both call this, so they see the same inputs."""
    enc = tokenizer.apply_chat_template([list(c) for c in conversations],
                                        add_generation_prompt=True, tokenize=True,
                                        return_dict=True)
    prompts = [list(ids) for ids in enc["input_ids"]]
    if max_positions is None:
        return prompts, 0
    limit = max_positions - max_new_tokens
    if limit < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                         f"this model's {max_positions} positions")
    cut = 0
    for i, ids in enumerate(prompts):
        if len(ids) > limit:
            prompts[i] = ids[-limit:]
            cut += 1
    return prompts, cut


def replay(backend: InferenceBackend, user_turns: Sequence[Sequence[str]], *, max_new_tokens: int,
           temperature: float = 0.0, system: str | None = None,
           on_turn: Callable[[int, int], None] | None = None) -> list[Conversation]:
    """Replay each row's user turns against the backend; returns the full conversations.

    All rows still active at turn t are generated in one batch call, so a 6-turn set costs six
    batched passes, not one pass per row per turn. `on_turn(t, n_active)` reports progress.

    A backend with a `replay_session()` context manager (the transformers backend) is asked through
    the session it yields, keyed by row: it may carry each conversation's state (keys and
    values) from one turn to the next instead of re-encoding the conversation, and is told
    which rows have a next turn. The replies must be the ones `backend.generate` would give.
    """
    conversations: list[Conversation] = [
        ([{"role": "system", "content": system}] if system else []) for _ in user_turns
    ]
    max_turns = max((len(t) for t in user_turns), default=0)
    open_session = getattr(backend, "replay_session", None)
    with (open_session() if callable(open_session) else nullcontext()) as session:
        for t in range(max_turns):
            active = [i for i, turns in enumerate(user_turns) if len(turns) > t]
            if on_turn is not None:
                on_turn(t, len(active))
            for i in active:
                conversations[i].append({"role": "user", "content": user_turns[i][t]})
            batch = [conversations[i] for i in active]
            if session is not None:
                replies = session.generate(batch, keys=active,
                                           keep=[len(user_turns[i]) > t + 1 for i in active],
                                           max_new_tokens=max_new_tokens, temperature=temperature)
            else:
                replies = backend.generate(batch, max_new_tokens=max_new_tokens,
                                           temperature=temperature)
            if len(replies) != len(active):
                raise RuntimeError(f"backend {backend.name!r} returned {len(replies)} replies "
                                   f"for {len(active)} conversations")
            for i, reply in zip(active, replies):
                conversations[i].append({"role": "assistant", "content": reply})
    return conversations
