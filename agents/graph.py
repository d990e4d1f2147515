"""The closed loop as a LangGraph `StateGraph`:

    baseline -> plan -> check --ok--> review -> build -> train -> evaluate -> archive --> plan ...
                  ^        | invalid (at most         |                                     -> finish
                  '-revise-'  planner.max_revisions)  '-> (chat: a person edits -> review again,
                           | still invalid                 rejects -> plan, approves -> build)
                           '-> refuse: fallback planner / last valid action --> review
                                                        (nothing valid) ---> skip --> plan ...

With `loop.candidates: N` > 1 a round plans and checks N candidates (plan -> check -> plan ...,
the heuristic exploring, the LLM planner told the earlier ones), then hands every one that
passed to the candidates node in place of review/build/train/evaluate:

    plan -> check --next candidate--> plan ... --all N checked, one passed--> candidates -> archive
                  '--none passed--> revise / refuse, as above

`build_graph` wires the nodes (agents/nodes.py); their `LoopContext` (planner, fallback, audit
log, run folder, base model) is LangGraph's run context (`context_schema`), given to each
stream by the driver (agents/runner.py), so tests build the graph with scripted planners. With a
checkpointer (SQLite in the run folder), a killed run resumes at the node in flight, which
re-runs from its start (every node is safe to repeat). A run is finished when the finish node
says so (`finished` in the state).
"""

from __future__ import annotations

from typing import Any

from langgraph.graph import END, START, StateGraph

from mosaic.agents import nodes
from mosaic.agents.context import LoopContext
from mosaic.agents.state import LoopState

NODES = ("baseline", "plan", "check", "revise", "refuse", "review", "build", "train", "evaluate",
         "candidates", "archive", "skip", "finish")


def build_graph(*, checkpointer: Any = None) -> Any:
    """The compiled loop graph; run it with `context=LoopContext(...)`."""
    g = StateGraph(LoopState, context_schema=LoopContext)
    for name in NODES:
        g.add_node(name, getattr(nodes, name))
    g.add_conditional_edges(START, lambda s: "plan" if s.get("history") else "baseline",
                            {"plan": "plan", "baseline": "baseline"})
    g.add_conditional_edges("baseline", nodes.after_round, {"plan": "plan", "finish": "finish"})
    g.add_edge("plan", "check")
    g.add_conditional_edges("check", nodes.after_check,
                            {"execute": "review", "revise": "revise", "refuse": "refuse",
                             "candidate": "plan", "candidates": "candidates"})
    g.add_edge("revise", "plan")
    g.add_conditional_edges("refuse", nodes.after_refuse, {"execute": "review", "skip": "skip"})
    # In chat the review node pauses for a person (interrupt); otherwise it passes through.
    g.add_conditional_edges("review", nodes.after_review,
                            {"execute": "build", "plan": "plan", "review": "review"})
    g.add_edge("build", "train")
    g.add_edge("train", "evaluate")
    g.add_edge("evaluate", "archive")
    g.add_edge("candidates", "archive")
    for name in ("archive", "skip"):
        g.add_conditional_edges(name, nodes.after_round, {"plan": "plan", "finish": "finish"})
    g.add_edge("finish", END)
    return g.compile(checkpointer=checkpointer)
