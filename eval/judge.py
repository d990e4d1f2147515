"""The judge interface: text in, L3 atoms out; and what a judge may fail with.

Judges extract atoms only; the objective type turns atoms into L2/L1 deterministically. Built-in
judges: the rule-based judge (default, offline) and the LLM judge over an OpenAI-compatible
endpoint. An objective type whose response atoms are verifiable by code (`ifeval`, through the
IFEval checker) gets them from `ObjectiveType.code_response_atoms` whatever judge is
configured: `JudgeBase` routes that in one place, so a new judge only labels what needs judging.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from mosaic.eval.base import get_objective_type

Conversation = Sequence[Mapping[str, str]]
Channel = Literal["prompt", "response"]


@dataclass(frozen=True)
class JudgeCapabilities:
    """What a caller may ask of a judge without surprises.

    `per_turn`: labelling every earlier assistant turn of a multi-turn conversation (to see when
    a jailbreak first leaked) is affordable. True for local judges; False for a judge that
    sends a request per sample, where it would multiply the requests by the number of turns.
    """

    per_turn: bool


@runtime_checkable
class Judge(Protocol):
    name: str
    capabilities: JudgeCapabilities

    def identity(self) -> dict[str, Any]:
        """What determines this judge's labels (completion markers hash it)."""
        ...

    def response_atoms(self, objective_type: str, conversations: Sequence[Conversation],
                       prompt_atoms: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Response-channel L3 atoms of each conversation's last assistant turn. May raise
        `JudgeError` carrying the atoms it did get."""
        ...

    def prompt_atoms(self, objective_type: str,
                     conversations: Sequence[Conversation]) -> list[dict[str, Any]]:
        """Prompt-channel L3 atoms, for datasets that do not carry them. May raise `JudgeError`."""
        ...


@dataclass(frozen=True)
class JudgeFailure:
    """A sample the judge could not label: its last reply and why it was rejected."""

    index: int
    objective_type: str
    channel: Channel
    errors: tuple[str, ...]
    last_reply: str
    attempts: int
    # A short code to count failures by: "unparsed_reply" (the reply was not usable labels),
    # "endpoint_<reason>" (the request failed for good, e.g. endpoint_http_500), or what else
    # kept the judge from labelling ("undecided_atoms").
    reason: str = "unparsed_reply"

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "objective_type": self.objective_type, "channel": self.channel,
                "errors": list(self.errors), "last_reply": self.last_reply[:2000],
                "attempts": self.attempts, "reason": self.reason}


class JudgeError(RuntimeError):
    """Some samples got no valid atoms.

    `partial` holds the atoms of every sample that did get them (None where not), so a caller
    can keep those and record the failures as data.
    """

    def __init__(self, judge: str, failures: Sequence[JudgeFailure],
                 partial: Sequence[dict[str, Any] | None]):
        self.failures = list(failures)
        self.partial = list(partial)
        first = self.failures[0]
        super().__init__(
            f"{judge} could not label {len(self.failures)} of {len(self.partial)} sample(s) "
            f"({first.objective_type}/{first.channel}); first: sample {first.index} after "
            f"{first.attempts} attempt(s): {'; '.join(first.errors)}")


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


class JudgeRangeError(ValueError):
    """A judge measured on the sandbox's text only was asked to label other text."""


def check_judge_range(judge: Any, files: Sequence[str | Path], *, allow: bool) -> list[str]:
    """Refuse, with the judge's measured range, to let a sandbox-only judge (`sandbox_only`)
    label text from `files` that are not the sandbox world's (mosaic.provenance decides by the
    world's manifest, not by name). With `allow` the refusal becomes a returned warning."""
    if not getattr(judge, "sandbox_only", False):
        return []
    from mosaic.provenance import is_sandbox_text

    outside = [str(f) for f in files if not is_sandbox_text(f)]
    if not outside:
        return []
    message = (f"the {judge.name!r} judge is measured on the sandbox world's text only, and "
               f"{', '.join(outside)} {'is' if len(outside) == 1 else 'are'} not the sandbox's (no "
               f"world.json lists {'it' if len(outside) == 1 else 'them'} with this content). "
               f"{getattr(judge, 'range_note', '')}")
    if allow:
        return [f"{message} Labelling anyway, as judge.allow_out_of_range asks: read its atoms "
                f"with that range in mind."]
    raise JudgeRangeError(f"{message} Use a judge measured on real text (judge.kind: llm or "
                          f"guard; check it on your own labels with `mosaic judge-agreement "
                          f"--labels`), or set judge.allow_out_of_range: true "
                          f"(--allow-out-of-range) to label with it anyway.")


class JudgeBase(ABC):
    """What every judge shares: the input contract and the routing of code-checked types.
    Subclasses implement `label_responses` and `label_prompts` for the types they judge."""

    name: str
    capabilities: JudgeCapabilities
    # True for a judge whose agreement is measured on the sandbox world's text only: it refuses
    # other text unless the user allows it (`check_judge_range`); `range_note` says why.
    sandbox_only: bool = False
    range_note: str = ""

    def identity(self) -> dict[str, Any]:
        return {"judge": self.name}

    @property
    def stats(self) -> dict[str, Any]:
        """What labelling cost so far: requests, retries by reason, tokens, cost (remote judges)."""
        return {}

    def response_atoms(self, objective_type: str, conversations: Sequence[Conversation],
                       prompt_atoms: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        check_judge_inputs(conversations, prompt_atoms)
        by_code = get_objective_type(objective_type).code_response_atoms(conversations, prompt_atoms)
        if by_code is not None:
            return by_code
        return self.label_responses(objective_type, conversations, prompt_atoms)

    def prompt_atoms(self, objective_type: str,
                     conversations: Sequence[Conversation]) -> list[dict[str, Any]]:
        otype = get_objective_type(objective_type)
        if otype.prompt_atoms_from_data:
            raise ValueError(f"{objective_type!r} prompt atoms ({', '.join(otype.prompt_atoms)}) "
                             f"come from the dataset's columns, not from a judge")
        return self.label_prompts(objective_type, conversations)

    @abstractmethod
    def label_responses(self, objective_type: str, conversations: Sequence[Conversation],
                        prompt_atoms: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Response atoms of a type no code can check (inputs already checked)."""

    @abstractmethod
    def label_prompts(self, objective_type: str,
                      conversations: Sequence[Conversation]) -> list[dict[str, Any]]:
        """Prompt atoms of a type whose datasets may lack them."""

