"""The loop's state as the LangGraph checkpoint stores it: small, JSON-shaped, one round at a time.

Large things (reports, datasets, adapters) live in the run folder; the state holds what the
routers need and what must survive a crash: where the loop is, the proposal under check, the
action that will run and who decided it, and the executed history.
"""

from __future__ import annotations

from typing import Any, TypedDict


class HistoryEntry(TypedDict, total=False):
    round: int
    action: dict[str, Any] | None  # the executed DataAction (None for the baseline)
    author: str  # planner | fallback | human | system
    eval: dict[str, float]
    heldout: dict[str, float] | None
    skipped: bool
    accepted: bool  # False: a person's acceptance guard refused the round (kept out of the archive)


class LoopState(TypedDict, total=False):
    round: int  # the round being planned or run (0: the baseline has not run)
    rounds: int  # rounds this run does (raised when a finished run is extended)
    revision: int  # proposals checked so far for this round
    proposal: dict[str, Any] | None  # the latest Proposal
    verdict: dict[str, Any] | None  # the check's ActionVerdict on it
    feedback: list[str]  # problems (or a person's reason) the next proposal must address
    action: dict[str, Any] | None  # the checked action that will run this round
    author: str | None  # whose decision `action` is
    history: list[HistoryEntry]
    # What a person set in chat; it persists for later rounds and binds the planner too.
    human_limits: dict[str, Any]  # floors, ceilings, max_change, guards (see agents/context.py)
    notes: list[str]  # standing guidance shown to the planner
    # At a pause (mosaic chat): what the person decided, and what to tell them next time.
    decision: str | None  # "execute" | "plan" | "review"
    review_message: str | None
    human_seq: int  # human events in this round (makes their audit ids unique and stable)
    finished: bool
    # loop.candidates > 1 only (absent otherwise): the candidate being planned this round
    # (0-based), and this round's checked candidates so far, each {index, raw, verdict, error}.
    candidate: int
    candidates: list[dict[str, Any]]
