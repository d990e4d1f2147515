"""Baseline planners for the search-quality benchmark (bench/search_quality.py).

They search the same action space as the heuristic planner's numeric levers (mixture weights,
per-objective bucket weights, per-objective quality thresholds) without reading the failure
reports: `uniform` (one static equal mixture), `random` (the paper's baseline: a random action
each round) and `optuna` (TPE or NSGA-II over the space, one trial per round, told each round's
eval scores). Focus criteria are left to the heuristic: they have no fixed-size encoding.

An action that the check refuses (e.g. a bucket the pool cannot fill) is not sent: the planner
draws again, up to `MAX_DRAWS` times, so the loop's fallback never runs on their behalf.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from mosaic.agents.planners.base import PlanContext
from mosaic.schemas import Proposal

THRESHOLDS = ("none", "3", "4", "5")
MAX_DRAWS = 25
MIN_SHARE = 0.02  # weights below this are dropped (a bucket or pool with a sliver of budget)


def _slices(ctx: PlanContext, name: str) -> list[str]:
    cap = ctx.tools.pool_capacity(name)
    return sorted(b for b, t in cap.available_tokens.items() if t > 0)


def _normalised(raw: dict[str, float]) -> dict[str, float]:
    total = sum(raw.values())
    w = {k: v / total for k, v in raw.items()} if total > 0 else {k: 1 / len(raw) for k in raw}
    w = {k: v for k, v in w.items() if v >= MIN_SHARE}
    total = sum(w.values())
    out = {k: round(v / total, 6) for k, v in w.items()}
    big = max(out, key=lambda k: out[k])
    out[big] = round(1.0 - sum(v for k, v in out.items() if k != big), 6)
    return out


def action_from_params(params: dict[str, Any], ctx: PlanContext) -> dict[str, Any]:
    """The DataAction JSON of one point of the search space."""
    names = list(ctx.objectives)
    mixture = _normalised({n: float(params[f"w:{n}"]) for n in names})
    objectives: dict[str, Any] = {}
    for n in mixture:
        oa: dict[str, Any] = {}
        buckets = {k.split(":", 2)[2]: float(v) for k, v in params.items()
                   if k.startswith(f"b:{n}:")}
        if buckets:
            oa["bucket_weights"] = _normalised(buckets)
        q = params.get(f"q:{n}", "none")
        if q != "none":
            oa["quality_threshold"] = float(q)
        if oa:
            objectives[n] = oa
    return {"mixture": mixture, "objectives": objectives, "method": "sft"}


def params_from_action(action: Any, ctx: PlanContext, slices: dict[str, list[str]]) -> dict[str, Any]:
    """The point of the space an executed action is (for telling Optuna about past rounds)."""
    params: dict[str, Any] = {}
    for n in ctx.objectives:
        params[f"w:{n}"] = float(action.mixture.get(n, 0.0))
        oa = action.objectives.get(n)
        for s in slices[n]:
            bw = oa.bucket_weights if oa is not None and oa.bucket_weights else None
            params[f"b:{n}:{s}"] = float(bw.get(s, 0.0)) if bw else 1.0 / len(slices[n])
        q = oa.quality_threshold if oa is not None else action.quality_threshold
        params[f"q:{n}"] = "none" if q is None else str(int(q))
    return params


def _proposal(name: str, action: dict[str, Any], note: str) -> Proposal:
    action = {**action, "rationale": note}
    return Proposal(raw=json.dumps(action, sort_keys=True), planner=name, rationale=note)


class UniformPlanner:
    """One static equal mixture over every objective, all buckets, no threshold."""

    name = "uniform"

    def propose(self, ctx: PlanContext) -> Proposal:
        n = len(ctx.objectives)
        mixture = _normalised({name: 1.0 / n for name in ctx.objectives})
        return _proposal(self.name, {"mixture": mixture, "method": "sft"}, "uniform baseline")


class RandomPlanner:
    """A random action each round, from a generator seeded by (seed, round)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def propose(self, ctx: PlanContext) -> Proposal:
        rng = np.random.default_rng([self.seed, ctx.round])
        slices = {n: _slices(ctx, n) for n in ctx.objectives}
        for draw in range(MAX_DRAWS):
            params: dict[str, Any] = {f"w:{n}": rng.uniform() for n in ctx.objectives}
            for n, ss in slices.items():
                params.update({f"b:{n}:{s}": rng.uniform() for s in ss})
                params[f"q:{n}"] = THRESHOLDS[int(rng.integers(len(THRESHOLDS)))]
            action = action_from_params(params, ctx)
            if ctx.tools.dry_run_action(action).ok:
                return _proposal(self.name, action, f"random baseline (draw {draw + 1})")
        return UniformPlanner().propose(ctx)


class OptunaPlanner:
    """An Optuna sampler over the action space, one trial per round, maximising every eval score.

    The study is rebuilt from the run's history at every proposal (past actions and their scores
    become completed trials), so a resumed run asks the sampler exactly where it left off. Two
    things make a rebuilt study go on as a kept one would: the sampler is seeded by (seed, number
    of past trials), so a start-up draw is not the first draw of the same seed again (it was, and
    TPE's two start-up rounds were one action twice); and each past trial carries its NSGA-II
    generation (trial i is in generation i // population), without which NSGA-II saw every
    trial as generation 0 and drew the same random individual every round.
    `startup` is TPE's number of random start-up trials / NSGA-II's population size: Optuna's
    defaults (10 and 50) would make a five-round search pure random sampling.
    """

    def __init__(self, sampler: str = "tpe", seed: int = 0, startup: int = 2) -> None:
        if sampler not in ("tpe", "nsga2"):
            raise ValueError(f"sampler must be 'tpe' or 'nsga2', got {sampler!r}")
        self.sampler, self.seed, self.startup = sampler, seed, startup
        self.name = sampler

    def _study(self, ctx: PlanContext, slices: dict[str, list[str]]):
        import optuna
        from optuna.distributions import CategoricalDistribution, FloatDistribution
        from optuna.trial import create_trial

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        names = list(ctx.objectives)
        past = [h for h in ctx.history if h.action is not None and h.accepted
                and all(n in h.eval for n in names)]
        seed = int(np.random.SeedSequence([self.seed, len(past)]).generate_state(1)[0])
        population = max(2, self.startup)
        if self.sampler == "tpe":
            sampler = optuna.samplers.TPESampler(n_startup_trials=self.startup, seed=seed,
                                                 multivariate=True)
        else:
            sampler = optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
        study = optuna.create_study(directions=["maximize"] * len(names), sampler=sampler)
        dists: dict[str, Any] = {}
        for n in names:
            dists[f"w:{n}"] = FloatDistribution(0.0, 1.0)
            dists.update({f"b:{n}:{s}": FloatDistribution(0.0, 1.0) for s in slices[n]})
            dists[f"q:{n}"] = CategoricalDistribution(THRESHOLDS)
        generation_key = optuna.samplers.NSGAIISampler._get_generation_key()
        for i, h in enumerate(past):
            params = params_from_action(h.action, ctx, slices)
            attrs = {generation_key: i // population} if self.sampler == "nsga2" else {}
            study.add_trial(create_trial(params=params, distributions=dists,
                                         values=[h.eval[n] for n in names], system_attrs=attrs))
        return study, dists

    def propose(self, ctx: PlanContext) -> Proposal:
        import optuna

        slices = {n: _slices(ctx, n) for n in ctx.objectives}
        study, dists = self._study(ctx, slices)
        for draw in range(MAX_DRAWS):
            trial = study.ask(dists)
            action = action_from_params(trial.params, ctx)
            if ctx.tools.dry_run_action(action).ok:
                return _proposal(self.name, action,
                                 f"{self.sampler} trial {trial.number} (draw {draw + 1})")
            # An unfillable point is a failed trial: the sampler learns to avoid it.
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return UniformPlanner().propose(ctx)


def make_baseline(name: str, seed: int = 0, startup: int = 2):
    """A baseline planner by method name: uniform, random, tpe, nsga2."""
    if name == "uniform":
        return UniformPlanner()
    if name == "random":
        return RandomPlanner(seed)
    if name in ("tpe", "nsga2"):
        return OptunaPlanner(name, seed, startup)
    raise ValueError(f"unknown baseline {name!r}; expected uniform, random, tpe or nsga2")
