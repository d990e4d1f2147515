"""Every data contract MOSAIC passes between stages, in one place, with a schema version.

A run directory from an older release must either load or fail with a clear message, so every
top-level record carries `schema_version` and is validated on read.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1

Role = Literal["system", "user", "assistant"]
# How a round trains on an objective's data: SFT on its rows, DPO on its pairs, or SFT on the
# pairs' chosen answers followed by DPO on the same pairs.
TrainMethod = Literal["sft", "dpo", "sft+dpo"]
# A round's training set: one method, or `mixed` when objectives differ (`methods` says which).
DatasetMethod = Literal["sft", "dpo", "sft+dpo", "mixed"]


def data_method(method: str) -> Literal["sft", "dpo"]:
    """The rows a method trains on: SFT rows, or preference pairs (dpo, sft+dpo)."""
    return "sft" if method == "sft" else "dpo"


class Strict(BaseModel):
    """Base for records parsed from files or model output: unknown fields are an error."""

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------
# Samples and the L1-L3 evaluation interface
# --------------------------------------------------------------------------------------------


class Message(Strict):
    role: Role
    content: str


class L1(Strict):
    """Per-sample level-1 result: what the planner and the reports reason over."""

    slice: str
    score: float = Field(ge=1, le=5)
    valid: bool
    weight: float = Field(ge=0)
    failure: bool


class SampleRecord(Strict):
    """One evaluated or pool sample: prompt channel, response channel, and its L3/L2/L1."""

    schema_version: int = SCHEMA_VERSION
    id: str
    objective: str
    messages: list[Message]
    metadata: dict[str, Any] = Field(default_factory=dict)
    l3_prompt: dict[str, Any] = Field(default_factory=dict)
    l3_response: dict[str, Any] | None = None
    l2: dict[str, Any] | None = None
    l1: L1 | None = None


# --------------------------------------------------------------------------------------------
# Failure reports
# --------------------------------------------------------------------------------------------


class SliceStats(Strict):
    slice: str
    n: int
    n_valid: int
    mean: float | None
    ci_low: float | None
    ci_high: float | None
    fail_rate: float | None
    need: float
    reliability: Literal["low", "medium", "high"]
    gap_to_target: float | None


class BorderlineExample(Strict):
    """An anonymised example near a failure boundary, shown to the planner."""

    slice: str
    score: float
    prompt_excerpt: str
    response_excerpt: str
    l2: dict[str, Any] = Field(default_factory=dict)


class FailureReport(Strict):
    schema_version: int = SCHEMA_VERSION
    objective: str
    objective_type: str
    round: int
    f: float | None
    f_ci_low: float | None = None  # 95% bootstrap CI of f over valid samples
    f_ci_high: float | None = None
    n: int
    n_valid: int
    target: float | None = None
    score_distribution: dict[str, int]
    slices: list[SliceStats]
    breakdowns: dict[str, Any] = Field(default_factory=dict)
    examples: list[BorderlineExample] = Field(default_factory=list)


class EvalReport(Strict):
    """All objectives' failure reports for one evaluated model (a round or the baseline)."""

    schema_version: int = SCHEMA_VERSION
    round: int
    model: str
    adapter: str | None = None
    split: Literal["eval", "heldout"] = "eval"
    reports: dict[str, FailureReport]
    # objective -> samples the judge could not label (left out of f; see samples.parquet)
    judge_failures: dict[str, int] = Field(default_factory=dict)

    def scores(self) -> dict[str, float | None]:
        return {name: rep.f for name, rep in self.reports.items()}


# --------------------------------------------------------------------------------------------
# Data actions
# --------------------------------------------------------------------------------------------


def _finite(name: str, value: float) -> float:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


class FocusCriteria(Strict):
    """Focus on rows matching any `include` criterion; drop rows matching any `exclude` one.

    Keys are objective-type specific (see each objective type's `focus_keys`); the validator
    checks them against the type, so here they are free-form.
    """

    include: dict[str, Any] = Field(default_factory=dict)
    exclude: dict[str, Any] = Field(default_factory=dict)


class ObjectiveAction(Strict):
    bucket_weights: dict[str, float] | None = None
    focus: FocusCriteria | None = None
    focus_ratio: float = 0.0
    # Minimum pool score for this objective's rows (SFT) or chosen responses (DPO); overrides
    # the action's global quality_threshold, so one pool can ask for only its best answers
    # without starving the others.
    quality_threshold: float | None = None
    # This objective's training method this round; None: the action's `method`. Absent from
    # actions written before it existed, which therefore mean what they meant then.
    method: TrainMethod | None = None

    @field_validator("quality_threshold")
    @classmethod
    def _threshold_finite(cls, v: float | None) -> float | None:
        return None if v is None else _finite("quality_threshold", v)


class DataAction(Strict):
    """The planner's executable, declarative proposal for one round (never code)."""

    schema_version: int = SCHEMA_VERSION
    mixture: dict[str, float]
    objectives: dict[str, ObjectiveAction] = Field(default_factory=dict)
    quality_threshold: float | None = None
    method: TrainMethod = "sft"  # every objective's, unless objectives.<name>.method says
    rationale: str = ""

    @field_validator("quality_threshold")
    @classmethod
    def _threshold_finite(cls, v: float | None) -> float | None:
        return None if v is None else _finite("quality_threshold", v)

    def method_of(self, objective: str) -> TrainMethod:
        """The training method of one objective this round."""
        oa = self.objectives.get(objective)
        return oa.method if oa is not None and oa.method is not None else self.method

    def methods(self) -> dict[str, TrainMethod]:
        """Method per objective with a positive mixture weight (what the round trains)."""
        return {n: self.method_of(n) for n, w in self.mixture.items() if w > 0}


class Problem(Strict):
    """One reason an action cannot run as proposed, phrased so a planner can act on it."""

    code: str
    path: str  # JSON path into the action, e.g. "$.objectives.safety.bucket_weights.complexity_9"
    message: str
    hint: str = ""


class ActionVerdict(Strict):
    schema_version: int = SCHEMA_VERSION
    status: Literal["ok", "fixable", "invalid"]
    problems: list[Problem] = Field(default_factory=list)
    # The action as it will run: rounding-level renormalisation applied, never anything more.
    action: DataAction | None = None
    notes: list[str] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status != "invalid"


# --------------------------------------------------------------------------------------------
# Dataset building and training
# --------------------------------------------------------------------------------------------


class BucketManifest(Strict):
    objective: str
    bucket: str
    allocation: int
    tokens_used: int
    rows: int
    focus_rows: int
    focus_tokens: int
    shortfall: int
    available_tokens: int = 0  # what the bucket could supply after every filter
    focus_allocation: int = 0  # floor(focus_ratio x allocation): the focus rows' first claim
    focus_available_tokens: int = 0


class DatasetManifest(Strict):
    schema_version: int = SCHEMA_VERSION
    seed: int
    budget: int
    total_tokens: int
    total_rows: int
    method: DatasetMethod
    action_hash: str
    pool_hashes: dict[str, str]
    output_hash: str
    buckets: list[BucketManifest]
    dropped: dict[str, int] = Field(default_factory=dict)  # reason -> rows dropped
    dropped_by_objective: dict[str, dict[str, int]] = Field(default_factory=dict)
    allocations: dict[str, int] = Field(default_factory=dict)  # objective -> token allocation
    windowed_rows: int = 0  # selected rows shortened by whole turns to fit max_length
    max_length: int | None = None
    eval_items: int = 0  # distinct eval/held-out prompt hashes the overlap guard compared against
    notes: list[str] = Field(default_factory=list)
    # A `mixed` set: objective -> method (its rows carry it in a `method` column).
    methods: dict[str, TrainMethod] = Field(default_factory=dict)


class TrainResult(Strict):
    schema_version: int = SCHEMA_VERSION
    method: DatasetMethod
    base_model: str
    adapter_dir: str
    train_tokens: int
    train_rows: int
    steps: int
    final_loss: float | None
    seconds: float
    skipped: dict[str, int] = Field(default_factory=dict)  # reason -> rows skipped


class RoundResult(Strict):
    """What one round did: the verdict, and when it ran, the build, the training and the scores."""

    schema_version: int = SCHEMA_VERSION
    round: int
    status: Literal["baseline", "done", "rejected"]
    verdict: ActionVerdict | None = None
    action: DataAction | None = None
    manifest: DatasetManifest | None = None
    train: TrainResult | None = None
    scores: dict[str, float | None] = Field(default_factory=dict)
    heldout_scores: dict[str, float | None] | None = None


# --------------------------------------------------------------------------------------------
# The loop: proposals, the Pareto archive
# --------------------------------------------------------------------------------------------


Author = Literal["planner", "fallback", "human", "system"]


class ToolCall(Strict):
    """One tool call a planner made while proposing, summarised for the audit log."""

    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    result_summary: str = ""


class Proposal(Strict):
    """What a planner proposed: the raw text (checked by the validator, never trusted) and how
    it came to it."""

    schema_version: int = SCHEMA_VERSION
    raw: str
    planner: str  # "heuristic", "llm", ...
    model: str | None = None
    prompt_hash: str | None = None  # sha256 of the prompt templates used
    tool_calls: list[ToolCall] = Field(default_factory=list)
    rationale: str = ""
    error: str | None = None  # why no usable proposal came back (timeout, malformed reply, ...)


class SliceDiagnosis(Strict):
    """A planner tool's answer: one slice of one objective in the latest evaluated round."""

    objective: str
    slice: str
    stats: SliceStats | None  # None: the slice has no samples in the eval set
    share_of_need: float  # this slice's need / the objective's total need
    rank_by_need: int  # 1 = neediest
    history: dict[int, float | None] = Field(default_factory=dict)  # round -> slice mean
    breakdown: dict[str, Any] = Field(default_factory=dict)  # the type's breakdown for the slice
    advice: list[str] = Field(default_factory=list)


class ExampleView(Strict):
    """An eval sample shown to a planner: anonymised excerpts, to be read as untrusted data."""

    id: str
    slice: str
    score: float
    failed: bool
    turns: int
    prompt_excerpt: str
    response_excerpt: str
    l2: dict[str, Any] = Field(default_factory=dict)


class PoolCapacity(Strict):
    """What one pool can supply under a threshold and focus criteria (tokens per bucket)."""

    objective: str
    method: TrainMethod
    quality_threshold: float | None
    available_tokens: dict[str, int]  # bucket -> tokens left after every filter
    focus_tokens: dict[str, int]  # bucket -> of which match `include`
    total_tokens: int
    max_mixture_weight: float  # the largest mixture weight the pool can fill at the run's budget
    dropped: dict[str, int] = Field(default_factory=dict)


ChatOp = Literal["approve", "reject", "mix", "buckets", "focus", "exclude", "ratio", "threshold",
                 "method", "floor", "ceiling", "max_change", "guard", "clear_limits", "note"]


class ChatEdit(Strict):
    """One thing a person does at a pause (from a slash command or from free text through the
    chat model): typed, shown, then checked like any planner proposal before it applies."""

    op: ChatOp
    objective: str | None = None
    key: str | None = None  # focus key (focus/exclude)
    values: list[str | int] | None = None  # focus values
    weights: dict[str, float] | None = None  # mixture or bucket weights
    value: float | None = None  # threshold, ratio, floor, ceiling, max_change, guard
    text: str | None = None  # a rejection's reason, a note, the method

    def command(self) -> str:
        """The edit as the slash command that does the same (shown before it applies)."""
        o = self.objective or ""
        if self.op in ("mix", "buckets"):
            ws = " ".join(f"{k}={v:g}" for k, v in (self.weights or {}).items())
            return f"/{self.op} {o + ' ' if self.op == 'buckets' else ''}{ws}".strip()
        if self.op in ("focus", "exclude"):
            vals = ",".join(str(v) for v in self.values or [])
            return f"/{self.op} {o} {self.key}={vals}"
        if self.op == "method":
            return f"/method {o + ' ' if o else ''}{self.text or ''}".strip()
        if self.op in ("reject", "note"):
            return f"/{self.op} {self.text or ''}".strip()
        if self.op in ("approve", "clear_limits"):
            return f"/{self.op}"
        value = "none" if self.value is None else f"{self.value:g}"
        return f"/{self.op.replace('_', '')} {o} {value}".replace("  ", " ")


class ChatEdits(Strict):
    """What the chat model turns a person's free text into."""

    edits: list[ChatEdit]
    explanation: str = ""


class ArchivePoint(Strict):
    """One evaluated round in the Pareto archive (round 0 is the base model)."""

    round: int
    eval: dict[str, float]
    eval_ci: dict[str, tuple[float, float]] = Field(default_factory=dict)
    heldout: dict[str, float] | None = None
    heldout_ci: dict[str, tuple[float, float]] | None = None
    action_hash: str | None = None
    adapter: str | None = None
    author: Author | None = None


class ArchiveDecision(Strict):
    round: int
    on_front: bool
    dominated_by: list[int] = Field(default_factory=list)
    displaced: list[int] = Field(default_factory=list)  # front members this point dominates
    hypervolume_before: float
    hypervolume_after: float


class ParetoArchive(Strict):
    """Every evaluated round, its non-dominated front (all objectives maximised) and hypervolume."""

    schema_version: int = SCHEMA_VERSION
    objectives: list[str]
    reference: dict[str, float]  # hypervolume reference point (default: 1, the lowest score)
    points: list[ArchivePoint] = Field(default_factory=list)
    front: list[int] = Field(default_factory=list)  # rounds on the non-dominated front
    hypervolume: float = 0.0
    best: dict[str, int] = Field(default_factory=dict)  # objective -> round with the best score
    # Pairs of front members whose eval CIs overlap on every objective: not told apart.
    indistinct: list[tuple[int, int]] = Field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Auditing a run: `mosaic audit` (tools/audit_report.py, tools/verify_run.py)
# --------------------------------------------------------------------------------------------


class AuditEvent(Strict):
    """One audit-log entry as written. Shown generically (event, author, data), so events added
    later (a person's edits in chat, ...) appear without code of their own."""

    seq: int
    time: str | None = None
    event: str
    round: int | None = None
    author: str
    id: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class ObjectiveFailures(Strict):
    """One objective of an eval report as a planner saw it: f with its CI, the worst slices."""

    objective: str
    f: float | None
    f_ci_low: float | None = None
    f_ci_high: float | None = None
    target: float | None = None
    n: int
    n_valid: int
    worst_slices: list[SliceStats] = Field(default_factory=list)  # lowest mean first


class ProposalRecord(Strict):
    """One proposal of a round, the check's verdict on it and the feedback it got back."""

    revision: int
    author: str
    proposal: Proposal
    verdict: ActionVerdict | None = None
    feedback: list[str] = Field(default_factory=list)  # sent back for the next revision
    candidate: int | None = None  # loop.candidates > 1: which candidate of its revision


class CandidateSummary(Strict):
    """One of a round's candidate actions (loop.candidates > 1), from its audit entry."""

    index: int  # 0-based, in proposal order
    status: Literal["done", "rejected", "duplicate"]
    action_hash: str | None = None
    verdict: str | None = None
    problems: list[str] = Field(default_factory=list)
    duplicate_of: int | None = None
    eval: dict[str, float | None] = Field(default_factory=dict)
    hypervolume_after: float | None = None
    kept: bool = False


class ExecutedRecord(Strict):
    """The action a round ran, and whose decision it was."""

    action: DataAction
    action_hash: str
    decided_by: str  # planner | fallback | human | ...
    source: str | None = None  # a fallback's source ("heuristic planner", "last valid action")


class ObjectiveUsage(Strict):
    rows: int
    tokens: int
    focus_rows: int
    allocation: int = 0


class ManifestSummary(Strict):
    """A round's training set: rows and tokens per objective and bucket, focus rows used."""

    method: DatasetMethod | None = None  # None: only the audit log's summary was there
    budget: int
    total_tokens: int
    total_rows: int
    output_hash: str
    objectives: dict[str, ObjectiveUsage] = Field(default_factory=dict)
    buckets: list[BucketManifest] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


class ScoreChange(Strict):
    """One score (an objective's f, or a slice's mean) from one round to another, with 95% CIs."""

    split: Literal["eval", "heldout"]
    objective: str
    slice: str | None = None  # None: the objective's f
    before: float | None
    before_ci: tuple[float, float] | None = None
    after: float | None
    after_ci: tuple[float, float] | None = None
    delta: float | None = None
    separated: bool = False  # both CIs known and they do not overlap


class RoundAudit(Strict):
    """Everything the run folder says about one round, from the audit log and the round folder."""

    round: int
    status: Literal["baseline", "done", "skipped", "incomplete"]
    decided_by: str | None = None
    saw_round: int | None = None  # the evaluated round whose reports the planner read
    saw: list[ObjectiveFailures] = Field(default_factory=list)
    proposals: list[ProposalRecord] = Field(default_factory=list)
    candidates: list[CandidateSummary] = Field(default_factory=list)  # loop.candidates > 1
    refusal: dict[str, Any] | None = None
    fallback: dict[str, Any] | None = None
    skipped_reason: str | None = None
    executed: ExecutedRecord | None = None
    manifest: ManifestSummary | None = None
    train: TrainResult | None = None
    scores: dict[str, float | None] = Field(default_factory=dict)
    scores_ci: dict[str, tuple[float, float]] = Field(default_factory=dict)
    heldout_scores: dict[str, float | None] | None = None
    heldout_ci: dict[str, tuple[float, float]] = Field(default_factory=dict)
    slice_means: dict[str, dict[str, float | None]] = Field(default_factory=dict)  # eval
    changes: list[ScoreChange] = Field(default_factory=list)  # against `saw_round`
    archive: ArchiveDecision | None = None
    front: list[int] = Field(default_factory=list)  # the front after this round
    events: list[AuditEvent] = Field(default_factory=list)  # every log entry of the round


class AuditReport(Strict):
    """A run explained round by round (`mosaic audit RUN_DIR --json`)."""

    schema_version: int = SCHEMA_VERSION
    run_dir: str
    name: str
    objectives: list[str]
    targets: dict[str, float | None] = Field(default_factory=dict)
    budget: int
    log_entries: int = 0
    log_ok: bool = False  # the hash chain and head check out (`--verify` checks much more)
    log_problem: str | None = None
    rounds: list[RoundAudit] = Field(default_factory=list)
    run_events: list[AuditEvent] = Field(default_factory=list)  # entries outside any round
    archive: ParetoArchive | None = None
    warnings: list[str] = Field(default_factory=list)  # what could not be read, and why


class ValueChange(Strict):
    path: str  # dotted path into the action, e.g. "mixture.safety"
    a: Any = None
    b: Any = None


class RoundDiff(Strict):
    """What differs between two rounds: their executed actions and their scores."""

    schema_version: int = SCHEMA_VERSION
    a: int
    b: int
    action: list[ValueChange] = Field(default_factory=list)
    scores: list[ScoreChange] = Field(default_factory=list)  # before = round a, after = round b


class RunVerification(Strict):
    """`mosaic audit --verify`: every check that passed, or the first bad entry and why."""

    schema_version: int = SCHEMA_VERSION
    run_dir: str
    ok: bool
    entries: int = 0  # audit-log lines
    checked: list[str] = Field(default_factory=list)
    problem: str | None = None  # names the first bad entry (file, line or round) and why
    files: int = 0  # files recomputed against the sha256 the log recorded for them
    signed: bool = False  # the head's HMAC was checked (MOSAIC_AUDIT_HMAC_KEY)
    anchored: str | None = None  # the anchor (`N:sha256`, --expect) the log was checked against
    repairs: list[str] = Field(default_factory=list)  # logged --repair-audit entries, described


# --------------------------------------------------------------------------------------------
# Preflight: `mosaic doctor`
# --------------------------------------------------------------------------------------------


class DoctorCheck(Strict):
    """One thing `mosaic doctor` checked: what was found and, for a problem, how to fix it."""

    area: Literal["data", "annotation", "judge", "model", "accelerator", "endpoint"]
    name: str  # the config field or thing checked, e.g. "objectives.xguard.pool"
    status: Literal["ok", "warn", "problem"]
    detail: str
    fix: str | None = None


class DoctorEstimate(Strict):
    """One line of the per-round estimate and how it was estimated."""

    what: str
    value: str
    how: str


class DoctorReport(Strict):
    schema_version: int = SCHEMA_VERSION
    config: str
    checks: list[DoctorCheck] = Field(default_factory=list)
    estimate: list[DoctorEstimate] = Field(default_factory=list)

    @property
    def problems(self) -> list[DoctorCheck]:
        return [c for c in self.checks if c.status == "problem"]


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schemas of the public records, for export (`mosaic schema`) and for LLM prompts."""
    models = [SampleRecord, FailureReport, EvalReport, DataAction, ActionVerdict,
              DatasetManifest, TrainResult, RoundResult, Proposal, ParetoArchive, AuditReport,
              RoundDiff, RunVerification, DoctorReport]
    return {m.__name__: m.model_json_schema() for m in models}
