"""The closed loop as a LangGraph `StateGraph`:

    baseline -> plan -> check --ok--> review -> build -> train -> evaluate -> archive --> plan ...
                  ^        | invalid (at most         |                                     -> finish
                  '-revise-'  planner.max_revisions)  '-> (chat: a person edits -> review again,
                           | still invalid                 rejects -> plan, approves -> build)
                           '-> refuse: fallback planner / last valid action --> review
                                                        (nothing valid) ---> skip --> plan ...

`build_graph` wires nodes (agents/nodes.py) to a `LoopContext`; tests build it with scripted
planners. With a checkpointer (SQLite in the run folder), a killed run resumes at the node in
flight, which re-runs from its start (every node is safe to repeat).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from langgraph.graph import END, START, StateGraph

from mosaic.agents import nodes
from mosaic.agents.context import LoopContext
from mosaic.agents.state import LoopState


def _bind(fn: Any, ctx: LoopContext) -> Any:
    bound = partial(fn, ctx=ctx)
    bound.__name__ = fn.__name__  # type: ignore[attr-defined]
    return bound


def build_graph(ctx: LoopContext, *, checkpointer: Any = None) -> Any:
    """The compiled loop graph over `ctx` (planner, fallback, audit log, run folder)."""
    g = StateGraph(LoopState)
    for name in ("baseline", "plan", "check", "revise", "refuse", "review", "build", "train",
                 "evaluate", "archive", "skip", "finish"):
        g.add_node(name, _bind(getattr(nodes, name), ctx))
    g.add_conditional_edges(START, lambda s: "plan" if s.get("history") else "baseline",
                            {"plan": "plan", "baseline": "baseline"})
    g.add_conditional_edges("baseline", _bind(nodes.after_round, ctx),
                            {"plan": "plan", "finish": "finish"})
    g.add_edge("plan", "check")
    g.add_conditional_edges("check", _bind(nodes.after_check, ctx),
                            {"execute": "review", "revise": "revise", "refuse": "refuse"})
    g.add_edge("revise", "plan")
    g.add_conditional_edges("refuse", _bind(nodes.after_refuse, ctx),
                            {"execute": "review", "skip": "skip"})
    # In chat the review node pauses for a person (interrupt); otherwise it passes through.
    g.add_conditional_edges("review", _bind(nodes.after_review, ctx),
                            {"execute": "build", "plan": "plan", "review": "review"})
    g.add_edge("build", "train")
    g.add_edge("train", "evaluate")
    g.add_edge("evaluate", "archive")
    for name in ("archive", "skip"):
        g.add_conditional_edges(name, _bind(nodes.after_round, ctx),
                                {"plan": "plan", "finish": "finish"})
    g.add_edge("finish", END)
    return g.compile(checkpointer=checkpointer)


def make_graph(config: dict[str, Any] | None = None) -> Any:
    """Factory for LangGraph's own tooling (langgraph.json): the sandbox config's graph with
    the heuristic planner, in the run folder the config names."""
    from pathlib import Path

    from mosaic.agents.planners import make_planner
    from mosaic.agents.planners.heuristic import HeuristicPlanner
    from mosaic.audit import AuditLog
    from mosaic.config import load_config

    path = ((config or {}).get("configurable") or {}).get("mosaic_config", "configs/sandbox.yaml")
    cfg = load_config(path)
    ctx = LoopContext(config=cfg, run_dir=Path(cfg.run_dir), planner=make_planner(cfg),
                      fallback=HeuristicPlanner(), audit=AuditLog(cfg.run_dir))
    return build_graph(ctx)
