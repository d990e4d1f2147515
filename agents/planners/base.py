"""What every planner gets and gives: a `PlanContext` in, a `Proposal` (raw JSON text) out.

A proposal is never trusted: the graph's check node validates it like any model output. The
context carries read-only views (reports, history, archive) and `PlannerTools`, the bound
versions of `mosaic.tools.planner_tools` for this run and round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from mosaic.config import LimitsConfig
from mosaic.schemas import (ActionVerdict, DataAction, ExampleView, FailureReport, ParetoArchive,
                            PoolCapacity, Proposal, SliceDiagnosis)


@dataclass(frozen=True)
class RoundRecord:
    """One finished round as planners see it: eval scores only. Held-out scores are kept from
    planners on purpose: a planner that steered by them would make them one more eval set, and
    they exist to catch what fits the eval templates."""

    round: int
    action: DataAction | None  # None for the baseline
    author: str
    eval: dict[str, float]
    accepted: bool = True  # False: a person's acceptance guard refused it


@dataclass(frozen=True)
class EarlierCandidate:
    """A candidate proposed earlier in the same round (loop.candidates > 1), as the check saw
    it: a planner told these can propose something else."""

    index: int  # 0-based, in proposal order
    raw: str  # the action as proposed
    status: str  # the check's verdict: ok | fixable | invalid
    problems: tuple[str, ...] = ()  # the verdict's problems, one line each


@dataclass
class PlannerTools:
    """The planner's tools bound to this run: the latest evaluated round, its pools and check."""

    eval_dir: Path | None  # <round_dir>/eval of the round whose reports the planner reads
    reports: dict[str, FailureReport]
    report_history: dict[str, dict[int, FailureReport]]  # objective -> round -> report
    pools: Any  # PreparedPools
    budget: int
    check: Callable[[str | dict[str, Any]], ActionVerdict]

    def diagnose_slice(self, objective: str, slice: str) -> SliceDiagnosis:
        from mosaic.tools.planner_tools import diagnose_slice

        if objective not in self.reports:
            raise ValueError(f"unknown objective {objective!r}; objectives: "
                             f"{', '.join(self.reports)}")
        return diagnose_slice(self.reports[objective], slice, eval_dir=self.eval_dir,
                              history=self.report_history.get(objective))

    def inspect_examples(self, objective: str, slice: str | None = None, which: str = "failed",
                         n: int = 3) -> list[ExampleView]:
        from mosaic.tools.planner_tools import inspect_examples

        if self.eval_dir is None:
            return []
        if objective not in self.reports:
            raise ValueError(f"unknown objective {objective!r}; objectives: "
                             f"{', '.join(self.reports)}")
        return inspect_examples(self.eval_dir, objective, slice=slice, which=which,  # type: ignore[arg-type]
                                n=n)

    def pool_capacity(self, objective: str, method: str = "sft",
                      quality_threshold: float | None = None,
                      include: dict[str, Any] | None = None,
                      exclude: dict[str, Any] | None = None) -> PoolCapacity:
        from mosaic.tools.planner_tools import pool_capacity

        return pool_capacity(self.pools, objective, self.budget, method=method,
                             quality_threshold=quality_threshold, include=include,
                             exclude=exclude)

    def dry_run_action(self, action: str | dict[str, Any]) -> ActionVerdict:
        return self.check(action)


@dataclass
class PlanContext:
    """Everything a planner may read to propose round `round`'s action."""

    round: int
    rounds: int
    objectives: dict[str, str]  # name -> objective type
    targets: dict[str, float]
    budget: int
    baseline: dict[str, float]
    reports: dict[str, FailureReport]  # eval-split reports of the latest evaluated round
    reports_round: int
    history: list[RoundRecord]  # executed rounds in order (the baseline first)
    archive: ParetoArchive | None
    limits: LimitsConfig  # the run's limits with the person's standing limits applied
    previous_action: DataAction | None
    tools: PlannerTools
    feedback: list[str] = field(default_factory=list)  # why the last proposal was sent back
    notes: list[str] = field(default_factory=list)  # standing guidance from a person (chat)
    seed: int = 0  # the round's seed, plus `candidate` (each candidate its own)
    # With loop.candidates > 1: which of the round's `candidates` this proposal is (0-based),
    # and the ones proposed before it this round.
    candidate: int = 0
    candidates: int = 1
    earlier_candidates: list[EarlierCandidate] = field(default_factory=list)


@runtime_checkable
class Planner(Protocol):
    name: str

    def propose(self, context: PlanContext) -> Proposal:
        """One data action as raw JSON text (with how the planner came to it)."""
        ...
