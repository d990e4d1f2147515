"""Planners: the heuristic one (default, offline, deterministic) and the LLM one (an
OpenAI-compatible endpoint with tool calls). Both return a `Proposal` the check validates."""

from __future__ import annotations

from mosaic.agents.planners.base import (EarlierCandidate, PlanContext, Planner, PlannerTools,
                                         RoundRecord)
from mosaic.config import MosaicConfig

__all__ = ["EarlierCandidate", "PlanContext", "Planner", "PlannerTools", "RoundRecord",
           "make_planner"]


def make_planner(config: MosaicConfig) -> Planner:
    """The planner the config names."""
    if config.planner.kind == "llm":
        from mosaic.agents.planners.llm import LLMPlanner

        assert config.planner.endpoint is not None  # the config validator guarantees it
        return LLMPlanner(config.planner.endpoint)
    from mosaic.agents.planners.heuristic import HeuristicPlanner, HeuristicSettings

    return HeuristicPlanner(HeuristicSettings(preference=config.planner.preference))
