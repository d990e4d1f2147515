"""Shared pieces of the sandbox generators: seeded RNG streams, prompts, responses, slices."""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mosaic.eval.base import get_objective_type

# The world's objectives: name -> objective type (DESIGN.md fixes the sandbox's names).
OBJECTIVES: dict[str, str] = {"safety": "jailbreak", "boundary": "overrefusal", "instruction": "ifeval"}


def derive_rng(seed: int, *parts: object) -> random.Random:
    """An independent RNG stream per (seed, split, objective, ...): adding rows to one split
    never shifts another split's draws."""
    digest = hashlib.sha256("|".join(map(str, (seed, *parts))).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def weighted(rng: random.Random, weights: Mapping[str, float]) -> str:
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


def quotas(total: int, shares: Mapping[str, float]) -> dict[str, int]:
    """Split `total` over keys by share, largest remainders first, so the counts add up."""
    norm = sum(shares.values())
    raw = {k: total * v / norm for k, v in shares.items()}
    out = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (out[k] - raw[k], k))[: total - sum(out.values())]:
        out[k] += 1
    return out


_WS = re.compile(r"\s+")


def prompt_key(user_turns: Sequence[str]) -> str:
    """Normalised content hash of a prompt's user turns (case and whitespace folded)."""
    text = "\x1e".join(_WS.sub(" ", t.strip().lower()) for t in user_turns)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Prompt:
    """A generated prompt: its user turns, the assistant replies to all but the last one (the
    conversation context in pool, judge and corpus rows), its ground-truth prompt atoms."""

    users: tuple[str, ...]
    replies: tuple[str, ...]
    atoms: dict[str, Any]
    meta: dict[str, Any]
    topic: Any = field(compare=False)

    def __post_init__(self) -> None:
        if len(self.replies) != len(self.users) - 1:
            raise ValueError(f"{len(self.users)} user turns need {len(self.users) - 1} context "
                             f"replies, got {len(self.replies)}")

    def user_messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": u} for u in self.users]

    def conversation(self, response: str) -> list[dict[str, str]]:
        msgs: list[dict[str, str]] = []
        for i, u in enumerate(self.users):
            msgs.append({"role": "user", "content": u})
            msgs.append({"role": "assistant", "content": self.replies[i] if i < len(self.replies)
                         else response})
        return msgs


@dataclass(frozen=True)
class Response:
    text: str
    atoms: dict[str, Any]
    cls: str


def null_response(type_name: str, prompt_atoms: Mapping[str, Any]) -> dict[str, Any]:
    """Response atoms that do not move the slice: every built-in type's slice depends on the
    prompt channel only, so this lets eval sets carry their slice without a response."""
    if type_name == "ifeval":
        m = len(prompt_atoms["instruction_id_list"])
        return {"status": ["checked"] * m, "strict": [True] * m, "loose": [True] * m}
    return {a: 0 for a in get_objective_type(type_name).response_atoms}


def prompt_slice(type_name: str, prompt_atoms: Mapping[str, Any]) -> str:
    otype = get_objective_type(type_name)
    return otype.score(prompt_atoms, null_response(type_name, prompt_atoms))[1].slice
