"""Run-time context of the loop's nodes: the run's settings, planners, audit log, run folder and
the resources resolved once when the run opened (the base model), plus the helpers that turn the
checkpointed state into what a planner or the check reads.

It reaches the nodes as LangGraph's run context (`context_schema=LoopContext`; a node takes
`runtime: Runtime[LoopContext]`), never through the checkpoint: it holds live objects (planners,
the open audit log) and is rebuilt by the driver each time a run is opened."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mosaic.agents.planners.base import (EarlierCandidate, PlanContext, Planner, PlannerTools,
                                         RoundRecord)
from mosaic.agents.state import LoopState
from mosaic.audit import AuditLog
from mosaic.config import LimitsConfig, MosaicConfig
from mosaic.io import read_record
from mosaic.schemas import ActionVerdict, DataAction, EvalReport, FailureReport


@dataclass(frozen=True)
class StageEvent:
    """A progress update for displays: a node started or finished."""

    stage: str
    round: int
    status: str  # "start" | "done"
    seconds: float = 0.0
    detail: str = ""


@dataclass
class LoopContext:
    config: MosaicConfig
    run_dir: Path
    planner: Planner
    fallback: Planner  # the heuristic planner: used when the planner's proposals are refused
    audit: AuditLog
    # The rounds this opening of the run goes to (config.loop.rounds, checked by the driver
    # against what already ran); the routers read it, so raising or lowering it takes effect.
    rounds: int = 0
    # The base model directory, resolved (built, converted or checked) once when the run opened;
    # None when the evaluation backend is an endpoint and no local model is configured.
    base_model: Path | None = None
    # The audit seq of this opening's run_started / run_resumed entry: a run that finishes
    # again after being extended or cut back logs its finish again (one per opening).
    opening: int = 0
    progress: Callable[[StageEvent], None] = lambda e: None
    say: Callable[[str], None] = lambda msg: None  # detailed messages from the tools
    review: bool = False  # pause before each action executes, for a person (mosaic chat)
    timings: dict[str, float] = field(default_factory=dict)

    def round_dir(self, k: int) -> Path:
        return self.run_dir / f"round_{k}"

    # ---- what planners and the check read ----------------------------------------------------

    def limits(self, state: LoopState) -> LimitsConfig:
        """The run's limits with the person's standing limits applied (tighter wins)."""
        return self.config.limits.tightened(state.get("human_limits"))

    def previous_action(self, state: LoopState) -> DataAction | None:
        for entry in reversed(state.get("history") or []):
            if entry.get("action") is not None:
                return DataAction.model_validate(entry["action"])
        return None

    def action_context(self, state: LoopState):
        from mosaic.tools.run_round import round_seed, run_data
        from mosaic.tools.validate_action import ActionContext

        data = run_data(self.config)
        ctx = ActionContext.from_config(self.config, data.prepared,
                                        previous_action=self.previous_action(state),
                                        eval_ids=data.eval_ids)
        return dataclasses.replace(ctx, limits=self.limits(state),
                                   seed=round_seed(self.config, state.get("round", 1)))

    def check(self, state: LoopState, raw: str | dict[str, Any]) -> ActionVerdict:
        from mosaic.tools.validate_action import validate_action

        return validate_action(raw, self.action_context(state))

    def eval_report(self, k: int, split: str = "eval") -> EvalReport | None:
        path = self.round_dir(k) / split / "eval_report.json"
        return read_record(path, EvalReport) if path.is_file() else None

    def plan_context(self, state: LoopState) -> PlanContext:
        from mosaic.tools.archive import load_archive
        from mosaic.tools.run_round import round_seed, run_data

        history = [h for h in state.get("history") or [] if not h.get("skipped")]
        latest = history[-1]["round"] if history else 0
        report = self.eval_report(latest)
        reports: dict[str, FailureReport] = dict(report.reports) if report else {}
        by_objective: dict[str, dict[int, FailureReport]] = {}
        for h in history:
            rep = self.eval_report(h["round"])
            for name, r in (rep.reports.items() if rep else ()):
                by_objective.setdefault(name, {})[h["round"]] = r
        tools = PlannerTools(eval_dir=self.round_dir(latest) / "eval", reports=reports,
                             report_history=by_objective,
                             pools=run_data(self.config).prepared,
                             budget=self.config.budget.max_tokens,
                             check=lambda raw: self.check(state, raw))
        records = [RoundRecord(round=h["round"],
                               action=DataAction.model_validate(h["action"]) if h["action"] else None,
                               author=h["author"], eval=h["eval"],
                               accepted=h.get("accepted", True))
                   for h in history]
        baseline = next((h["eval"] for h in history if h["round"] == 0), {})
        k = state.get("round", 1)
        n = self.config.loop.candidates
        j = state.get("candidate", 0) if n > 1 else 0
        return PlanContext(
            round=k, rounds=self.rounds,
            objectives={n: o.type for n, o in self.config.objectives.items()},
            targets={n: o.target for n, o in self.config.objectives.items()},
            budget=self.config.budget.max_tokens, baseline=baseline, reports=reports,
            reports_round=latest, history=records, archive=load_archive(self.run_dir),
            limits=self.limits(state), previous_action=self.previous_action(state), tools=tools,
            feedback=list(state.get("feedback") or []), notes=list(state.get("notes") or []),
            seed=round_seed(self.config, k) + j, candidate=j, candidates=n,
            earlier_candidates=self.earlier_candidates(state) if n > 1 else [])

    def earlier_candidates(self, state: LoopState) -> list[EarlierCandidate]:
        """This round's candidates checked before the one being planned (loop.candidates > 1)."""
        j = state.get("candidate", 0)
        out = []
        for c in state.get("candidates") or []:
            if c["index"] >= j:
                continue
            verdict = ActionVerdict.model_validate(c["verdict"])
            problems = tuple(f"[{p.code}] {p.path}: {p.message}" for p in verdict.problems)
            if c.get("error"):
                problems = (f"no usable reply: {c['error']}", *problems)
            out.append(EarlierCandidate(index=c["index"], raw=c["raw"], status=verdict.status,
                                        problems=problems))
        return out

    # ---- timing ---------------------------------------------------------------------------------

    def timed(self, stage: str, k: int, fn: Callable[[], Any], detail: str = "") -> tuple[Any, float]:
        self.progress(StageEvent(stage, k, "start", detail=detail))
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds
        from mosaic.display import stage_figures

        # The stage's figures in one line, for logs (mosaic.display.stage_figures).
        self.progress(StageEvent(stage, k, "done", seconds=seconds, detail=stage_figures(out)))
        return out, seconds
