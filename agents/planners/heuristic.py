"""The heuristic planner: deterministic, need- and gap-driven, no network (the embedded default).

Policy, rule by rule (each pinned by a test on hand-built reports, tests/test_heuristic_planner.py):

R1 Mixture from gaps. An objective's goal is its target, or the baseline's score when the base
   model already does better (what the base can do must not be given away); its gap is
   max(0, goal - f) with f from the latest evaluated round (the baseline in round 1). Weights
   are a floor `min_weight` for every objective (none drops out of training and is forgotten;
   data for one objective protects it against another's) plus the rest shared in proportion to
   gap x responsiveness. Responsiveness is what the history shows an objective gains per unit of
   mixture weight, relative to the most responsive one and clipped to [0.25, 1] (1 before any
   round has run): budget goes where data has moved scores, not into a gap data does not close.
   No gap anywhere: the previous mixture (or uniform).
R2 Recovery. If the latest round fell below the best archived score of an objective by more
   than that score's CI half-width (a regression, not noise), the mixture steps back halfway
   toward the action of the archive's anchor point (the front member with the best worst-case
   improvement over the baseline), and the regressed objective's weight is not lowered.
R3 Trust region. No mixture weight moves more than `max_step` from the previous action (a
   person's `max_change` is tighter when set); floors and ceilings are applied last.
R4 Quality lever, per objective: the threshold takes only the best answers (score 5), together
   with what the objective's type says to keep out beside it (`ObjectiveType.quality_exclude`,
   e.g. disclaimer- and preaching-heavy answers to benign lookalikes). Quality comes before
   quantity: a threshold is kept while the pool fills at least 70% of the allocation (the
   weight is then capped at what it holds, R7), and steps down (5 -> 4 -> none) only below that. Measured on the sandbox:
   safety's score-5 answers at weight 0.34 gained more than score-4-and-up at 0.5.
R5 Buckets from slice need. A slice's weight blends its share of the objective's need (damped
   where reliability is low: x0.5, medium: x0.75) with its share of the pool's supply, half and
   half, then is capped by what the bucket can supply after the filters.
R6 Focus on the situations that fail, as the objective's type reads its own report
   (`ObjectiveType.planner_focus`, e.g. the worst pressure x concealment patterns of attacks,
   the boundary levels where benign prompts were refused, the constraint complexities that
   fail most). focus_ratio 0.5. Only prompt-side keys: response-side ones select answers
   that failed, which the quality threshold keeps out.
R7 Capacity. A mixture weight never exceeds what its pool can fill under the chosen filters;
   the excess goes to the other objectives. The action is dry-run through the check; if it is
   still refused, the quality thresholds step down once more and it is checked again.
R8 Probe. Every round trains from the same base, so repeating a mixture only re-draws the
   sample. When the mixture would repeat the latest round's (every weight within 0.03) and that
   round did not reach the Pareto front, `probe_step` of weight moves to one objective, in turn
   by round, within the bounds: the next round measures the trade-off there.
R9 Method, per objective (only with `planner.preference` set to dpo or sft+dpo; the default,
   off, trains every objective by SFT). An objective trains by the preference method until one
   round has measured it, then by whichever method's rounds gained more over the baseline per
   unit of mixture weight (ties: SFT). Each round trains from the base, so the gains of rounds
   by different methods compare directly.
R10 Candidates (loop.candidates N > 1: the round trains N candidates side by side and keeps the
   one that adds most to the archive). The rules above are deterministic -- the seed the loop
   gives candidate j (the round's seed + j) changes nothing -- so N proposals by them would be
   one action N times. Candidate 0 is the rules' proposal; candidate j >= 1 explores: it moves
   `explore_step` x ceil(j / n) of mixture weight to one objective, in turn by round and
   candidate (objective (round + j - 1) mod n first, skipping those at a bound), within the
   trust region, floors, ceilings and pool capacity (R3, R7) -- a deliberate R8 probe, so a
   round measures trade-offs the rules alone would not try. Where every objective is at a
   bound the candidate repeats an earlier one; the loop drops such exact duplicates (the same
   action apart from its rationale) before training (mosaic.tools.candidates).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mosaic.agents.planners.base import PlanContext, RoundRecord
from mosaic.eval.base import get_objective_type
from mosaic.schemas import FailureReport, Proposal

RELIABILITY_DAMPING = {"low": 0.5, "medium": 0.75, "high": 1.0}
THRESHOLD_STEPS = (5.0, 4.0, None)


@dataclass(frozen=True)
class HeuristicSettings:
    min_weight: float = 0.25  # R1: every objective keeps at least this share (or 0.75 / n)
    min_responsiveness: float = 0.25  # R1: the least share of its gap an objective gets
    max_step: float = 0.25  # R3: trust region on mixture weights
    need_share: float = 0.5  # R5: weight of need vs supply in bucket weights
    focus_ratio: float = 0.5  # R6
    top_patterns: int = 3  # R6: the most values per focus key the type may include
    capacity_margin: float = 0.97  # R7: use at most this share of a pool's supply
    max_quality_cut: float = 0.3  # R4: the share of an allocation given up to keep a threshold
    repeat_tol: float = 0.03  # R8: mixtures this close count as a repeat
    probe_step: float = 0.1  # R8: weight moved to the probed objective
    preference: str = "off"  # R9: off | dpo | sft+dpo (planner.preference)
    explore_step: float = 0.1  # R10: weight a candidate after the first moves to one objective


def _normalise(w: Mapping[str, float]) -> dict[str, float]:
    total = sum(max(0.0, v) for v in w.values())
    if total <= 0:
        return {k: 1.0 / len(w) for k in w}
    return {k: max(0.0, v) / total for k, v in w.items()}


def _round_weights(w: Mapping[str, float], digits: int = 4) -> dict[str, float]:
    """Weights rounded for a readable action, still summing to exactly 1 (the largest absorbs
    the rounding)."""
    out = {k: round(v, digits) for k, v in w.items() if v > 0}
    if not out:
        return {}
    big = max(out, key=lambda k: (out[k], k))
    out[big] = round(1.0 - sum(v for k, v in out.items() if k != big), digits)
    return {k: v for k, v in out.items() if v > 0}


def project(w: Mapping[str, float], lo: Mapping[str, float], hi: Mapping[str, float]
            ) -> dict[str, float]:
    """The point closest to `w` (Euclidean) with lo <= w <= hi per key and sum 1: w + lambda,
    clipped, with lambda found by bisection. Bounds that cannot sum to 1 are relaxed in that
    direction (the floors scaled down, or the ceilings up); the check rejects what stays
    impossible."""
    keys = list(w)
    lo_ = {k: max(0.0, lo.get(k, 0.0)) for k in keys}
    hi_ = {k: min(1.0, max(lo_[k], hi.get(k, 1.0))) for k in keys}
    if sum(lo_.values()) > 1.0:
        scale = 1.0 / sum(lo_.values())
        lo_ = {k: v * scale for k, v in lo_.items()}
    if sum(hi_.values()) < 1.0:
        hi_ = {k: 1.0 for k in keys}

    def at(lam: float) -> dict[str, float]:
        return {k: min(hi_[k], max(lo_[k], w[k] + lam)) for k in keys}

    a, b = -1.0 - max(w.values(), default=0.0), 1.0 + max(-min(w.values(), default=0.0), 0.0)
    for _ in range(100):
        mid = (a + b) / 2
        if sum(at(mid).values()) < 1.0:
            a = mid
        else:
            b = mid
    out = at((a + b) / 2)
    total = sum(out.values())
    return {k: v / total for k, v in out.items()} if total > 0 else out


class HeuristicPlanner:
    """`Planner` following the rules in the module docstring."""

    name = "heuristic"

    def __init__(self, settings: HeuristicSettings = HeuristicSettings()) -> None:
        self.s = settings

    # ---- R9: the method ---------------------------------------------------------------------------

    def method(self, ctx: PlanContext, name: str) -> str:
        """The objective's training method this round (R9)."""
        if self.s.preference == "off":
            return "sft"
        gains: dict[str, list[float]] = {"sft": [], self.s.preference: []}
        for h in ctx.history:
            if h.action is None or not h.accepted or name not in h.eval \
                    or name not in ctx.baseline:
                continue
            w = h.action.mixture.get(name, 0.0)
            m = h.action.method_of(name)
            if w >= 0.1 and m in gains:
                gains[m].append((h.eval[name] - ctx.baseline[name]) / w)
        if not gains[self.s.preference]:
            return self.s.preference
        mean = {m: sum(v) / len(v) for m, v in gains.items() if v}
        return self.s.preference if mean[self.s.preference] > mean.get("sft", -math.inf) \
            else "sft"

    # ---- R1, R2, R3: the mixture ---------------------------------------------------------------

    def goals(self, ctx: PlanContext) -> dict[str, float]:
        return {n: max(ctx.targets[n], ctx.baseline.get(n, ctx.targets[n])) for n in ctx.objectives}

    def responsiveness(self, ctx: PlanContext) -> dict[str, float]:
        """Score gained over the baseline per unit of mixture weight, averaged over the rounds
        that gave the objective at least 0.1, relative to the most responsive objective."""
        gain: dict[str, list[float]] = {n: [] for n in ctx.objectives}
        for h in ctx.history:
            if h.action is None or not h.accepted:
                continue
            for n in ctx.objectives:
                w = h.action.mixture.get(n, 0.0)
                if w >= 0.1 and n in h.eval and n in ctx.baseline:
                    gain[n].append((h.eval[n] - ctx.baseline[n]) / w)
        per = {n: max(0.0, sum(v) / len(v)) for n, v in gain.items() if v}
        top = max(per.values(), default=0.0)
        if top <= 0:
            return {n: 1.0 for n in ctx.objectives}
        return {n: min(1.0, max(self.s.min_responsiveness, per[n] / top)) if n in per else 1.0
                for n in ctx.objectives}

    def gap_mixture(self, ctx: PlanContext, scores: Mapping[str, float]) -> dict[str, float]:
        names = list(ctx.objectives)
        goals = self.goals(ctx)
        resp = self.responsiveness(ctx)
        gaps = {n: max(0.0, goals[n] - scores.get(n, goals[n])) * resp[n] for n in names}
        total = sum(gaps.values())
        if total <= 0:
            prev = ctx.previous_action.mixture if ctx.previous_action else {}
            return _normalise({n: prev.get(n, 1.0) for n in names})
        floor = min(self.s.min_weight, 0.75 / len(names))
        rest = 1.0 - floor * len(names)
        return {n: floor + rest * gaps[n] / total for n in names}

    def regressions(self, ctx: PlanContext) -> list[str]:
        """Objectives whose latest score fell below their best archived score by more than the
        best point's CI half-width."""
        if ctx.archive is None or not ctx.history or ctx.history[-1].round == 0:
            return []
        latest = ctx.history[-1]
        out = []
        for name in ctx.objectives:
            best = max((p for p in ctx.archive.points if name in p.eval),
                       key=lambda p: p.eval[name], default=None)
            if best is None or best.round == latest.round or name not in latest.eval:
                continue
            lo, hi = best.eval_ci.get(name, (best.eval[name], best.eval[name]))
            margin = max((hi - lo) / 2, 1e-9)
            if latest.eval[name] < best.eval[name] - margin:
                out.append(name)
        return out

    def anchor(self, ctx: PlanContext) -> RoundRecord | None:
        """The front member with the best worst-case improvement over the baseline."""
        if ctx.archive is None:
            return None
        front = set(ctx.archive.front)
        members = [h for h in ctx.history if h.round in front and h.action is not None]
        if not members or not ctx.baseline:
            return None

        def worst_gain(h: RoundRecord) -> float:
            return min(h.eval.get(n, -math.inf) - ctx.baseline.get(n, 0.0) for n in ctx.objectives)

        return max(members, key=lambda h: (worst_gain(h), -h.round))

    def mixture(self, ctx: PlanContext, notes: list[str]) -> dict[str, float]:
        latest = ctx.history[-1].eval if ctx.history else ctx.baseline
        w = self.gap_mixture(ctx, latest)
        goals, resp = self.goals(ctx), self.responsiveness(ctx)
        notes.append("gaps to goal (x responsiveness): " + ", ".join(
            f"{n} {max(0.0, goals[n] - latest.get(n, goals[n])):.2f} (x{resp[n]:.2f})"
            for n in ctx.objectives))
        regressed = self.regressions(ctx)
        anchor = self.anchor(ctx)
        if regressed and anchor is not None and anchor.action is not None:
            anchor_mix = anchor.action.mixture
            stepped = {n: 0.5 * w[n] + 0.5 * anchor_mix.get(n, 0.0) for n in w}
            prev = ctx.previous_action.mixture if ctx.previous_action else {}
            for n in regressed:  # never lower the weight of what regressed
                stepped[n] = max(stepped[n], prev.get(n, 0.0), w[n])
            w = _normalise(stepped)
            notes.append(f"regressed vs the archive: {', '.join(regressed)}; stepping halfway "
                         f"back toward round {anchor.round}'s mixture")
        lo, hi = self.bounds(ctx)
        return project(w, lo, hi)

    def probe(self, ctx: PlanContext, mix: Mapping[str, float], lo: Mapping[str, float],
              hi: Mapping[str, float], notes: list[str]) -> dict[str, float]:
        """R8: a mixture that repeats the latest round's, after a round that added nothing to
        the front, learns nothing new: move `probe_step` of weight to one objective (in turn
        by round, skipping those at a bound) to measure the trade-off there instead."""
        prev = ctx.previous_action.mixture if ctx.previous_action else None
        if prev is None or any(abs(mix[n] - prev.get(n, 0.0)) > self.s.repeat_tol for n in mix):
            return dict(mix)
        latest = ctx.history[-1].round if ctx.history else 0
        if ctx.archive is None or latest in ctx.archive.front:
            return dict(mix)
        names = list(ctx.objectives)
        for i in range(len(names)):
            target = names[(ctx.round + i) % len(names)]
            if hi[target] - mix[target] >= self.s.probe_step / 2:
                raised = dict(mix)
                raised[target] = min(hi[target], mix[target] + self.s.probe_step)
                moved = project(raised, {**lo, target: raised[target]}, hi)
                notes.append(f"round {latest} repeated this mixture without reaching the front: "
                             f"probing with more {target} ({mix[target]:.2f} -> "
                             f"{moved[target]:.2f})")
                return moved
        return dict(mix)

    def explore(self, ctx: PlanContext, mix: Mapping[str, float], lo: Mapping[str, float],
                hi: Mapping[str, float], notes: list[str]) -> dict[str, float]:
        """R10: candidate j >= 1 of a round moves `explore_step` x ceil(j / n) of weight to one
        objective (in turn by round and candidate, skipping those at a bound)."""
        j = ctx.candidate
        if j <= 0:
            return dict(mix)
        names = list(ctx.objectives)
        step = self.s.explore_step * ((j - 1) // len(names) + 1)
        for i in range(len(names)):
            target = names[(ctx.round + j - 1 + i) % len(names)]
            if hi[target] - mix[target] >= self.s.explore_step / 2:
                raised = dict(mix)
                raised[target] = min(hi[target], mix[target] + step)
                moved = project(raised, {**lo, target: raised[target]}, hi)
                notes.append(f"candidate {j + 1} of {ctx.candidates}: exploring with more "
                             f"{target} ({mix[target]:.2f} -> {moved[target]:.2f})")
                return moved
        notes.append(f"candidate {j + 1} of {ctx.candidates}: every objective is at a bound, "
                     f"nothing to explore")
        return dict(mix)

    def bounds(self, ctx: PlanContext) -> tuple[dict[str, float], dict[str, float]]:
        """Per-objective mixture bounds: the person's floors and ceilings, and the trust region
        around the previous action (the tighter of max_step and the person's max_change)."""
        prev = ctx.previous_action.mixture if ctx.previous_action else None
        step = self.s.max_step
        if ctx.limits.max_change is not None:
            step = min(step, ctx.limits.max_change)
        lo = {n: ctx.limits.floors.get(n, 0.0) for n in ctx.objectives}
        hi = {n: ctx.limits.ceilings.get(n, 1.0) for n in ctx.objectives}
        if prev is not None:
            for n in ctx.objectives:
                lo[n] = max(lo[n], prev.get(n, 0.0) - step)
                hi[n] = min(hi[n], prev.get(n, 0.0) + step)
        return lo, hi

    # ---- R4-R7: per objective --------------------------------------------------------------------

    def quality(self, ctx: PlanContext, name: str, alloc: int, level: int
                ) -> tuple[float | None, dict[str, Any], float]:
        """(threshold, exclude criteria, largest fillable mixture weight) at step `level`."""
        # The type's quality rule (what to keep out beside the threshold) goes with the
        # threshold: at the last step, nothing is filtered.
        exclude: dict[str, Any] = {}
        if level < len(THRESHOLD_STEPS) - 1:
            exclude = dict(get_objective_type(ctx.objectives[name]).quality_exclude())
        for q in THRESHOLD_STEPS[level:]:
            cap = ctx.tools.pool_capacity(name, self.method(ctx, name), quality_threshold=q,
                                          exclude=exclude or None)
            # Quality before quantity: keep the threshold while the pool fills most of the
            # allocation (the weight is then capped at what it holds, R7); step down only when
            # it would lose more than `max_quality_cut` of it.
            fill = cap.total_tokens * self.s.capacity_margin
            if q is None or fill >= alloc * (1 - self.s.max_quality_cut):
                return q, exclude, cap.max_mixture_weight * self.s.capacity_margin
        raise AssertionError("unreachable: the last step has no threshold")

    def focus(self, report: FailureReport | None, otype: str) -> dict[str, Any]:
        if report is None:
            return {}
        # The type picks the criteria (STYLE.md 15); it names only prompt-side keys: they pick
        # the situations the model fails in, and the quality threshold picks good answers to them.
        return get_objective_type(otype).planner_focus(report, self.s.top_patterns)

    def buckets(self, report: FailureReport | None, avail: Mapping[str, int],
                alloc: int) -> dict[str, float] | None:
        if report is None or alloc <= 0 or not avail:
            return None
        need = {s.slice: s.need * RELIABILITY_DAMPING[s.reliability] for s in report.slices
                if s.slice in avail}
        total_need, total_avail = sum(need.values()), sum(avail.values())
        if total_need <= 0 or total_avail <= 0:
            return None
        w = {b: self.s.need_share * need.get(b, 0.0) / total_need
             + (1 - self.s.need_share) * avail[b] / total_avail for b in avail}
        cap = {b: min(1.0, avail[b] * self.s.capacity_margin / alloc) for b in avail}
        if sum(cap.values()) < 1.0:
            return None  # the buckets cannot be weighted: let supply decide
        return _round_weights(project(w, {}, cap))

    # ---- the proposal -------------------------------------------------------------------------------

    def propose(self, ctx: PlanContext) -> Proposal:
        notes: list[str] = []
        mixture = self.mixture(ctx, notes)
        action: dict[str, Any] = {}
        for level in range(len(THRESHOLD_STEPS)):
            action = self._action(ctx, mixture, level, notes if level == 0 else [])
            verdict = ctx.tools.dry_run_action(action)
            if verdict.ok:
                break
            notes.append(f"dry run at quality level {level} refused "
                         f"({'; '.join(p.code for p in verdict.problems[:3])}); relaxing")
        if ctx.feedback:
            notes.append("feedback on the last proposal: " + " | ".join(ctx.feedback[:3]))
        action["rationale"] = "; ".join(notes)[:1500]
        return Proposal(raw=json.dumps(action, sort_keys=True), planner=self.name,
                        rationale=action["rationale"])

    def _action(self, ctx: PlanContext, mixture: Mapping[str, float], level: int,
                notes: list[str]) -> dict[str, Any]:
        budget = ctx.budget
        # R7 capacity first: a pool that cannot fill its weight under its filters gives the
        # excess to the others.
        plans: dict[str, tuple[float | None, dict[str, Any], float]] = {}
        for name in ctx.objectives:
            plans[name] = self.quality(ctx, name, int(budget * mixture.get(name, 0.0)), level)
        lo, hi = self.bounds(ctx)
        hi = {n: min(hi[n], plans[n][2]) for n in ctx.objectives}  # capacity wins
        lo = {n: min(lo[n], hi[n]) for n in ctx.objectives}
        mix = project(mixture, lo, hi)
        mix = self.probe(ctx, mix, lo, hi, notes)
        mix = _round_weights(self.explore(ctx, mix, lo, hi, notes))
        objectives: dict[str, Any] = {}
        for name, otype in ctx.objectives.items():
            w = mix.get(name, 0.0)
            if w <= 0:
                continue
            q, exclude, _ = plans[name]
            report = ctx.reports.get(name)
            include = self.focus(report, otype)
            cap = ctx.tools.pool_capacity(name, self.method(ctx, name), quality_threshold=q,
                                          exclude=exclude or None, include=include or None)
            alloc = int(budget * w)
            oa: dict[str, Any] = {}
            bw = self.buckets(report, cap.available_tokens, alloc)
            if bw:
                oa["bucket_weights"] = bw
            if include or exclude:
                oa["focus"] = {"include": include, "exclude": exclude}
            if include:
                oa["focus_ratio"] = self.s.focus_ratio
            if q is not None:
                oa["quality_threshold"] = q
            method = self.method(ctx, name)
            if method != "sft":  # SFT is the action's method: the key appears only when used
                oa["method"] = method
            objectives[name] = oa
            notes.append(f"{name}: weight {w:.2f}, threshold {q}, "
                         f"{'exclude ' + json.dumps(exclude) if exclude else 'no exclude'}, "
                         f"focus {json.dumps(include) if include else 'none'}")
        return {"mixture": mix, "objectives": objectives, "method": "sft"}


__all__ = ["HeuristicPlanner", "HeuristicSettings", "project"]
