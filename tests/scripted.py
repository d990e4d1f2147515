"""A scripted planner for loop tests: proposes given raw texts in order (then a good action)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from mosaic.agents.planners.base import PlanContext
from mosaic.schemas import Proposal

GOOD = {"mixture": {"safety": 0.5, "boundary": 0.3, "instruction": 0.2}, "method": "sft",
        "rationale": "scripted"}


@dataclass
class ScriptedPlanner:
    """Proposes the scripted raw texts in order, and remembers what it was shown."""

    script: list[str]
    name: str = "scripted"
    seen: list[PlanContext] = field(default_factory=list)
    fallback: dict = field(default_factory=lambda: GOOD)
    rationale: str = ""

    def propose(self, context: PlanContext) -> Proposal:
        self.seen.append(context)
        raw = self.script.pop(0) if self.script else json.dumps(self.fallback)
        return Proposal(raw=raw, planner=self.name, rationale=self.rationale)
