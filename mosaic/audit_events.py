"""The audit log's records: one typed, versioned model per event kind, shared by the writers
(`mosaic.audit.AuditLog.append` validates every entry's data against its kind's model before it
is written) and the readers (`mosaic audit`, `--verify`, the HTML report parse entries with the
same models).

An entry is an envelope (`AuditEntry`: seq, time, event, round, author, id, data, prev, v,
files) around the event's data. `v` is the version of the entry's record:

    1  entries written before records were typed: no `v` and no `files` in the line
    2  `files`: the sha256 of every file the event wrote (path relative to the run folder), so
       `mosaic audit --verify` can recompute what the report and the planner read

Writers are strict and readers tolerant: a field a model does not declare is an error when
writing (a typo, or a new field that belongs in its model first) but is kept when reading, so a
log written by a later version still reads here, and an older log (version 1, fields that were
optional then) reads with the same models.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from mosaic.schemas import Problem, ToolCall

ENTRY_VERSION = 2  # what AuditLog writes now (see the module docstring)


class EventData(BaseModel):
    """Base of every event's data: unknown fields are kept on read, refused on write."""

    model_config = ConfigDict(extra="allow")
    KIND: ClassVar[str] = ""

    @model_validator(mode="after")
    def _strict_when_writing(self, info: ValidationInfo) -> EventData:
        if info.context and info.context.get("writing") and self.model_extra:
            raise ValueError(f"unknown field(s) {sorted(self.model_extra)} for a "
                             f"{self.KIND!r} audit event: declare them on "
                             f"{type(self).__name__} in mosaic/audit_events.py")
        return self


# ---- the run -------------------------------------------------------------------------------


class RunStarted(EventData):
    KIND: ClassVar[str] = "run_started"
    rounds: int
    planner: str
    run_dir: str | None = None
    mode: str | None = None  # "chat" when a person steers it


class RunResumed(EventData):
    KIND: ClassVar[str] = "run_resumed"
    at: list[str] | None = None  # the graph nodes it resumed into
    round: int | None = None
    settings_changed: list[str] | None = None  # 'field: old -> new' (safe changes only)
    extended_to: int | None = None  # a finished run extended to this many rounds
    rounds: int | None = None  # the rounds this opening goes to (loop.rounds may change on resume)
    mode: str | None = None


class RunFinished(EventData):
    KIND: ClassVar[str] = "run_finished"
    rounds: int
    front: list[int] = Field(default_factory=list)
    hypervolume: float | None = None


class TornTailRecovered(EventData):
    KIND: ClassVar[str] = "torn_tail_recovered"
    moved_to: str
    bytes: int
    sha256: str


class AuditRepaired(EventData):
    """A person accepted a log shorter than its head (`--repair-audit`): what the head recorded,
    what was left, and how many entries are gone. The entry's `files` re-record every file an
    earlier entry had recorded, as it is at the repair."""

    KIND: ClassVar[str] = "audit_repaired"
    head_count: int
    head_last: str
    lines: int
    lost: int
    last_good: str  # the last entry left, named as verify names entries
    reason: str = ""
    flag: str = "--repair-audit"


# ---- a round: plan -> check -> revise / refuse ------------------------------------------------


class Baseline(EventData):
    KIND: ClassVar[str] = "baseline"
    eval: dict[str, float | None]
    heldout: dict[str, float | None] | None = None
    seconds: float | None = None


class ProposalMade(EventData):
    """A planner's proposal as kept in round_<k>/proposals/<revision>.json (`Proposal`)."""

    KIND: ClassVar[str] = "proposal"
    raw: str
    planner: str
    model: str | None = None
    prompt_hash: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    rationale: str = ""
    error: str | None = None
    revision: int = 0
    candidate: int | None = None  # loop.candidates > 1: which of the revision's candidates


class VerdictGiven(EventData):
    """The check's verdict (`ActionVerdict`) on one proposal."""

    KIND: ClassVar[str] = "verdict"
    status: Literal["ok", "fixable", "invalid"]
    problems: list[Problem] = Field(default_factory=list)
    action: dict[str, Any] | None = None
    notes: list[str] = Field(default_factory=list)


class Revision(EventData):
    KIND: ClassVar[str] = "revision"
    revision: int
    feedback: list[str] = Field(default_factory=list)
    verdict: str = ""


class Refusal(EventData):
    KIND: ClassVar[str] = "refusal"
    revisions: int
    last_problems: list[dict[str, Any]] | None = None


class Fallback(EventData):
    KIND: ClassVar[str] = "fallback"
    source: str
    raw: str
    verdict: str


class RoundSkipped(EventData):
    KIND: ClassVar[str] = "round_skipped"
    reason: str
    tried: list[str] = Field(default_factory=list)


# ---- a round: build -> train -> evaluate -> archive -------------------------------------------


class Executed(EventData):
    KIND: ClassVar[str] = "executed"
    action: dict[str, Any]
    action_hash: str
    decided_by: str | None = None
    candidate: int | None = None  # the kept candidate's index (loop.candidates > 1)


class CandidateRan(EventData):
    """One of a round's candidate actions (loop.candidates > 1), as `<round>/candidates.json`
    records it: run (done) in `round_dir`, rejected by the check (never built), or dropped as a
    duplicate of an earlier one; the kept one's executed/manifest/trained/scores follow."""

    KIND: ClassVar[str] = "candidate"
    index: int
    status: Literal["done", "rejected", "duplicate"]
    action_hash: str | None = None  # of the checked action (None: the check found none)
    verdict: str | None = None  # the loop's check: ok | fixable | invalid
    problems: list[str] = Field(default_factory=list)  # problem codes
    duplicate_of: int | None = None
    eval: dict[str, float | None] = Field(default_factory=dict)
    heldout: dict[str, float | None] | None = None
    hypervolume_after: float | None = None  # the archive's, with this candidate added
    on_front: bool | None = None
    kept: bool = False
    round_dir: str | None = None  # its folder, relative to the run folder (done ones)


class ManifestBuilt(EventData):
    KIND: ClassVar[str] = "manifest"
    output_hash: str
    total_tokens: int
    total_rows: int
    budget: int
    per_objective: dict[str, dict[str, int]] = Field(default_factory=dict)
    buckets: dict[str, int] = Field(default_factory=dict)
    seconds: float | None = None


class Trained(EventData):
    KIND: ClassVar[str] = "trained"
    train_tokens: int
    rows: int
    steps: int
    final_loss: float | None = None
    seconds: float | None = None


class Scores(EventData):
    KIND: ClassVar[str] = "scores"
    eval: dict[str, float | None]
    heldout: dict[str, float | None] | None = None
    seconds: float | None = None


class ArchiveUpdated(EventData):
    """The Pareto archive's decision (`ArchiveDecision`), or a round a person's guard kept out."""

    KIND: ClassVar[str] = "archive"
    round: int
    accepted: bool = True
    front: list[int] = Field(default_factory=list)
    on_front: bool | None = None
    dominated_by: list[int] = Field(default_factory=list)
    displaced: list[int] = Field(default_factory=list)
    hypervolume_before: float | None = None
    hypervolume_after: float | None = None
    violated: dict[str, dict[str, float]] | None = None  # objective -> {score, guard}


# ---- a person, in mosaic chat -------------------------------------------------------------------


class HumanEdit(EventData):
    KIND: ClassVar[str] = "human_edit"
    accepted: bool
    command: str = ""
    edits: list[dict[str, Any]] | None = None
    problems: str | list[str] | None = None
    notes: list[str] | None = None
    action: dict[str, Any] | None = None
    verdict: str | None = None


class HumanLimits(EventData):
    KIND: ClassVar[str] = "human_limits"
    accepted: bool = True
    command: str = ""
    limits: dict[str, Any] | None = None  # the whole new set of standing limits
    edits: list[dict[str, Any]] | None = None
    edit: dict[str, Any] | None = None  # the refused edit
    problems: list[str] | None = None


class HumanDecision(EventData):
    KIND: ClassVar[str] = "human_decision"
    decision: Literal["approve", "reject"]
    reason: str | None = None
    command: str = ""


EVENT_MODELS: dict[str, type[EventData]] = {m.KIND: m for m in (
    RunStarted, RunResumed, Baseline, ProposalMade, VerdictGiven, Revision, Refusal, Fallback,
    CandidateRan, Executed, ManifestBuilt, Trained, Scores, ArchiveUpdated, HumanEdit,
    HumanLimits, HumanDecision, RoundSkipped, RunFinished, TornTailRecovered, AuditRepaired)}
EVENTS: tuple[str, ...] = tuple(EVENT_MODELS)


class UnknownEvent(EventData):
    """An event kind this version does not know (a later version wrote it): kept as it is."""

    KIND: ClassVar[str] = "unknown"


class AuditEntry(BaseModel):
    """One line of audit.jsonl (see the module docstring)."""

    model_config = ConfigDict(extra="allow")

    seq: int
    time: str | None = None
    event: str
    round: int | None = None
    author: str = "system"
    id: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    prev: str
    v: int = 1  # absent in lines written before records were typed
    files: dict[str, str] = Field(default_factory=dict)  # path in the run folder -> sha256

    def payload(self) -> EventData:
        """The entry's data parsed with its kind's model (ValidationError when it does not fit;
        an unknown kind parses as `UnknownEvent`)."""
        return EVENT_MODELS.get(self.event, UnknownEvent).model_validate(self.data)


def check_data(event: str, data: dict[str, Any]) -> EventData:
    """Validate `data` for writing a `event` entry: ValueError naming the kind and the fields."""
    model = EVENT_MODELS.get(event)
    if model is None:
        raise ValueError(f"unknown audit event {event!r}; expected one of {EVENTS}")
    try:
        return model.model_validate(data, context={"writing": True})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(data)'}: {err['msg']}"
                             for err in e.errors())
        raise ValueError(f"a {event!r} audit event does not fit {model.__name__}: "
                         f"{problems}") from None


__all__ = ["ENTRY_VERSION", "EVENTS", "EVENT_MODELS", "AuditEntry", "EventData", "check_data",
           *(m.__name__ for m in EVENT_MODELS.values()), "UnknownEvent"]
