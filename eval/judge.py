"""The judge interface: text in, L3 atoms out.

Judges extract atoms only; the objective type turns atoms into L2/L1 deterministically. Built-in
judges: the rule-based judge (default, offline), the LLM judge over an OpenAI-compatible
endpoint, and the programmatic IFEval checker (used for `ifeval` whatever judge is configured,
because its constraints are verifiable by code).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

Conversation = Sequence[Mapping[str, str]]


@runtime_checkable
class Judge(Protocol):
    name: str

    def response_atoms(self, objective_type: str, conversations: Sequence[Conversation],
                       prompt_atoms: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Response-channel L3 atoms of each conversation's last assistant turn."""
        ...

    def prompt_atoms(self, objective_type: str,
                     conversations: Sequence[Conversation]) -> list[dict[str, Any]]:
        """Prompt-channel L3 atoms, for datasets that do not carry them."""
        ...


def check_judge_inputs(conversations: Sequence[Conversation],
                       prompt_atoms: Sequence[Mapping[str, Any]]) -> None:
    """The contract every judge's `response_atoms` relies on: one prompt-atom record per
    conversation, and each conversation ending with the assistant turn to judge."""
    if len(prompt_atoms) != len(conversations):
        raise ValueError(f"{len(conversations)} conversations but {len(prompt_atoms)} "
                         f"prompt-atom records")
    for i, conv in enumerate(conversations):
        if not conv or conv[-1]["role"] != "assistant":
            raise ValueError(f"conversation {i} must end with the assistant turn to judge; it "
                             f"ends with {conv[-1]['role'] if conv else 'nothing'!r}")
