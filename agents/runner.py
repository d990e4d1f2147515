"""Running the loop on a run folder: start, resume after a crash, extend, or report a finished run.

`run_loop` saves (or checks) the run's settings, opens the audit log and the SQLite checkpoint
in the run folder, and drives the graph with `stream`, reporting every node to `progress`. The
checkpoint decides where to go on: a fresh folder starts at the baseline; a killed run goes on
at the node in flight (which re-runs from its start; finished rounds are not redone); a finished
run returns its results without recomputing, unless `loop.rounds` was raised, which extends it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mosaic.agents.context import LoopContext, StageEvent
from mosaic.agents.planners.base import Planner
from mosaic.agents.state import LoopState
from mosaic.config import MosaicConfig

CHECKPOINT_FILE = "checkpoints.sqlite"
THREAD_ID = "loop"


@dataclass
class LoopOutcome:
    state: LoopState
    ran: bool  # False: the run was already finished and nothing was computed
    timings: dict[str, float]


def graph_config(rounds: int) -> dict[str, Any]:
    # ~10 steps a round plus revisions; the limit only guards against a wiring bug.
    return {"configurable": {"thread_id": THREAD_ID}, "recursion_limit": 40 * (rounds + 2)}


def open_checkpointer(run_dir: Path):
    """A SqliteSaver on the run's checkpoint file (one saver per file; close it when done)."""
    from langgraph.checkpoint.sqlite import SqliteSaver

    from mosaic.redact import RedactingSerde

    @contextmanager
    def saver():
        with SqliteSaver.from_conn_string(str(run_dir / CHECKPOINT_FILE)) as s:
            # No state the checkpoint saves may carry a secret (mosaic.redact).
            s.serde = RedactingSerde(s.serde)
            yield s

    return saver()


def run_loop(config: MosaicConfig, *, planner: Planner | None = None,
             fallback: Planner | None = None,
             progress: Callable[[StageEvent], None] | None = None,
             say: Callable[[str], None] | None = None,
             on_start: Callable[[str], None] | None = None) -> LoopOutcome:
    """Baseline + `config.loop.rounds` rounds in `config.run_dir`, resumable at any point.

    `on_start` is told how the run begins: "new", "resumed" or "extended" (or "finished").
    Raises RunBusyError when another process is running this folder.
    """
    from mosaic.eval import check_objective_types
    from mosaic.run_store import run_lock

    check_objective_types(config)
    with run_lock(config.run_dir):
        return _run_locked(config, planner, fallback, progress, say, on_start)


def _run_locked(config: MosaicConfig, planner: Planner | None, fallback: Planner | None,
                progress: Callable[[StageEvent], None] | None,
                say: Callable[[str], None] | None,
                on_start: Callable[[str], None] | None) -> LoopOutcome:
    from mosaic.agents.graph import build_graph
    from mosaic.agents.planners import make_planner
    from mosaic.agents.planners.heuristic import HeuristicPlanner
    from mosaic.audit import AuditLog
    from mosaic.run_store import open_run

    changes = open_run(config)
    run_dir = Path(config.run_dir)
    audit = AuditLog(run_dir)
    planner = planner or make_planner(config)
    fallback = fallback or (planner if isinstance(planner, HeuristicPlanner) else HeuristicPlanner())
    ctx = LoopContext(config=config, run_dir=run_dir, planner=planner, fallback=fallback,
                      audit=audit, progress=progress or (lambda e: None),
                      say=say or (lambda m: None))
    rounds = config.loop.rounds
    with open_checkpointer(run_dir) as saver:
        graph = build_graph(ctx, checkpointer=saver)
        gcfg = graph_config(rounds)
        snapshot = graph.get_state(gcfg)
        values: dict[str, Any] = dict(snapshot.values or {})
        if not values:
            how, payload = "new", {"rounds": rounds, "history": [], "round": 0}
            audit.append("run_started", {"rounds": rounds, "planner": planner.name,
                                         "run_dir": str(run_dir)})
        elif snapshot.next:
            how, payload = "resumed", None
            audit.append("run_resumed", {"at": list(snapshot.next), "round": values.get("round"),
                                         "settings_changed": changes})
        elif values.get("finished") and rounds > values.get("rounds", rounds):
            how = "extended"
            # Reopen the finished graph after its last round: the router goes on to plan.
            graph.update_state(gcfg, {"rounds": rounds, "finished": False}, as_node="archive")
            payload = None
            audit.append("run_resumed", {"extended_to": rounds, "round": values.get("round")})
        else:
            if on_start:
                on_start("finished")
            return LoopOutcome(state=values, ran=False, timings={})  # type: ignore[arg-type]
        if on_start:
            on_start(how)
        for _ in graph.stream(payload, gcfg, stream_mode="updates"):
            pass
        final = dict(graph.get_state(gcfg).values)
    return LoopOutcome(state=final, ran=True, timings=dict(ctx.timings))  # type: ignore[arg-type]
