"""The one driver of the loop graph: `mosaic run`, `mosaic chat` and langgraph.json's `make_graph`
all open a run folder and move its graph through `LoopDriver`.

Opening a run (`with LoopDriver(config) as driver`): the objective types are checked, the run
folder's lock is taken (one process per folder), the base model is resolved once (built, converted
or checked; the stages receive its path), the checkpoint is read and the requested `loop.rounds`
checked against what already ran, the audit log is opened (it refuses a log its head does not
vouch for), and only then are the settings saved or compared (`open_run`), so a refused opening
writes nothing. `begin()` says how the run goes on and logs
it: "new", "resumed" (a killed or paused run; the node that did not complete runs again),
"extended" (a finished run whose `loop.rounds` was raised) or "finished" (nothing to do).
`advance()` streams the graph until it pauses for a person (chat's review node) or finishes.

A run is finished when its state says so (`finished`, set by the finish node). An empty `next`
means nothing: LangGraph also leaves it empty when a step's writes were saved but the next
checkpoint was not, and streaming on from there applies those writes and goes on.

`loop.rounds` may change on resume: raised, the run goes on (a finished one is extended);
lowered, the run stops after that round -- unless rounds beyond it already ran or are under way,
which is refused with a message (their results exist and would silently disagree with the
setting).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mosaic.agents.context import LoopContext, StageEvent
from mosaic.agents.crashpoints import crash_point
from mosaic.agents.planners.base import Planner
from mosaic.agents.state import LoopState
from mosaic.config import MosaicConfig, load_config

CHECKPOINT_FILE = "checkpoints.sqlite"
THREAD_ID = "loop"


@dataclass
class LoopOutcome:
    state: LoopState
    ran: bool  # False: the run was already finished and nothing was computed
    timings: dict[str, float]


def graph_config(rounds: int, candidates: int = 1) -> dict[str, Any]:
    # ~10 steps a round plus revisions (each revision plans and checks every candidate); the
    # limit only guards against a wiring bug.
    return {"configurable": {"thread_id": THREAD_ID},
            "recursion_limit": 40 * candidates * (rounds + 2)}


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


def resolve_base_model(config: MosaicConfig) -> Path | None:
    """The run's base model directory, resolved once when the run opens (the sandbox world and
    model are built on first use and cached; a GGUF file is converted once). None when the
    evaluation backend is an endpoint and no local model is configured: then nothing trains."""
    if config.inference.backend == "openai" and config.model.base != "sandbox":
        from mosaic.training.gguf_convert import is_gguf_source

        if not (is_gguf_source(config.model.base) or Path(config.model.base).is_dir()):
            return None
    from mosaic.sandbox.base_model import ensure_base_model

    return Path(ensure_base_model(config, progress=False))


class LoopDriver:
    """Opens a run folder and drives its graph. Raises RunBusyError (another process holds the
    folder), RunConfigError (settings that may not change, or `loop.rounds` below what ran) or
    AuditRefused (a log its head does not vouch for) when entered; nothing is written then."""

    def __init__(self, config: MosaicConfig, *, planner: Planner | None = None,
                 fallback: Planner | None = None,
                 progress: Callable[[StageEvent], None] | None = None,
                 say: Callable[[str], None] | None = None, review: bool = False,
                 mode: str = "run") -> None:
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.rounds = config.loop.rounds
        self._planner, self._fallback = planner, fallback
        self._progress, self._say, self._review, self.mode = progress, say, review, mode
        self.changes: list[str] = []
        self._stack: Any = None

    # ---- opening and closing --------------------------------------------------------------------

    def __enter__(self) -> LoopDriver:
        from contextlib import ExitStack

        from mosaic.agents.graph import build_graph
        from mosaic.agents.planners import make_planner
        from mosaic.agents.planners.heuristic import HeuristicPlanner
        from mosaic.audit import AuditLog
        from mosaic.eval import check_objective_types
        from mosaic.run_store import open_run, run_lock

        check_objective_types(self.config)
        if self._review and self.config.loop.candidates > 1:
            from mosaic.run_store import RunConfigError

            raise RunConfigError(
                f"loop.candidates is {self.config.loop.candidates}: each round trains its "
                f"candidates side by side with no pause for a person, and mosaic chat pauses "
                f"before the one action of each round. Use mosaic run, or chat with "
                f"loop.candidates: 1 in a run folder started with it.")
        with ExitStack() as stack:
            stack.enter_context(run_lock(self.run_dir))
            base_model = resolve_base_model(self.config)
            saver = stack.enter_context(open_checkpointer(self.run_dir))
            self.graph = build_graph(checkpointer=saver)
            self.gcfg = graph_config(self.rounds, self.config.loop.candidates)
            snapshot = self.graph.get_state(self.gcfg)
            self._check_rounds(dict(snapshot.values or {}))
            audit = AuditLog(self.run_dir)  # refuses a log its head does not vouch for
            self.changes = open_run(self.config)
            planner = self._planner or make_planner(self.config)
            fallback = self._fallback or (planner if isinstance(planner, HeuristicPlanner)
                                          else HeuristicPlanner())
            self.ctx = LoopContext(config=self.config, run_dir=self.run_dir, planner=planner,
                                   fallback=fallback, audit=audit,
                                   progress=self._progress or (lambda e: None),
                                   say=self._say or (lambda m: None), review=self._review,
                                   rounds=self.rounds, base_model=base_model)
            # Bound: routers run outside a stream too (update_state), and read the context.
            self.graph = self.bound_graph()
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def _check_rounds(self, values: dict[str, Any]) -> None:
        """Refuse a `loop.rounds` below rounds that already ran or are under way."""
        from mosaic.run_store import RunConfigError

        if not values:
            return
        done = max((h["round"] for h in values.get("history") or []), default=0)
        k = values.get("round", 0)
        under_way = not values.get("finished") and k > done and bool(
            values.get("proposal") or values.get("action") or values.get("revision"))
        least = k if under_way else done
        if self.rounds >= least:
            return
        ran = (f"round {k} is under way" if under_way
               else f"{done} round{'s' if done != 1 else ''} ran" if done
               else "the baseline ran")
        raise RunConfigError(
            f"{self.run_dir}: loop.rounds {self.rounds} is below what this run already did "
            f"({ran}); their results would contradict the setting. Resume with loop.rounds "
            f"{least} or more (e.g. MOSAIC__loop__rounds={least}), or start a new run folder.")

    # ---- driving ----------------------------------------------------------------------------------

    @property
    def values(self) -> dict[str, Any]:
        return dict(self.graph.get_state(self.gcfg).values or {})

    def begin(self) -> str:
        """How the run goes on ("new", "resumed", "extended" or "finished"); logged."""
        snapshot = self.graph.get_state(self.gcfg)
        values = dict(snapshot.values or {})
        audit, mode = self.ctx.audit, {"mode": self.mode} if self.mode != "run" else {}
        self._input: Any = None
        if not values:
            self._input = {"rounds": self.rounds, "history": [], "round": 0}
            # An id: a crash before the first checkpoint starts the run again, not twice.
            entry = audit.append("run_started", {"rounds": self.rounds,
                                                 "planner": self.ctx.planner.name,
                                                 "run_dir": str(self.run_dir), **mode},
                                 event_id="run_started")
            self.ctx.opening = entry["seq"]
            return "new"
        if values.get("finished"):
            if self.rounds <= values.get("rounds", 0):
                return "finished"
            # Reopen the finished graph after its last round: the router goes on to plan.
            self.graph.update_state(self.gcfg, {"rounds": self.rounds, "finished": False},
                                    as_node="archive")
            entry = audit.append("run_resumed", {"extended_to": self.rounds,
                                                 "round": values.get("round"),
                                                 "settings_changed": self.changes, **mode})
            self.ctx.opening = entry["seq"]
            return "extended"
        if (snapshot.next == ("plan",) and not snapshot.interrupts
                and values.get("round", 1) > self.rounds):
            # Between rounds, with loop.rounds lowered to the rounds that ran: route to finish
            # (the routers read the driver's rounds) instead of planning another round.
            self.graph.update_state(self.gcfg, None, as_node="archive")
        entry = audit.append("run_resumed", {"at": list(snapshot.next),
                                             "round": values.get("round"), "rounds": self.rounds,
                                             "settings_changed": self.changes, **mode})
        self.ctx.opening = entry["seq"]
        return "resumed"

    def advance(self, resume: Any = None) -> dict[str, Any] | None:
        """Run the graph on; the payload of the pause it reaches (chat), or None when finished.
        `resume` is a person's answer (`Command(resume=...)`) to the pause it was at."""
        payload, self._input = (resume if resume is not None else self._input), None
        while True:
            snapshot = self.graph.get_state(self.gcfg)
            if payload is None and snapshot.interrupts:
                return snapshot.interrupts[0].value  # the same pause (a reopened chat)
            if payload is None and (snapshot.values or {}).get("finished"):
                return None
            progressed = self._stream(payload)
            payload = None
            if not progressed and not self.graph.get_state(self.gcfg).interrupts \
                    and not self.values.get("finished"):
                raise RuntimeError(f"the loop graph in {self.run_dir} stopped without finishing "
                                   f"or pausing (next: {self.graph.get_state(self.gcfg).next}); "
                                   f"this is a MOSAIC bug")

    def _stream(self, payload: Any) -> bool:
        """Stream the graph once; True if any node ran."""
        k = self.values.get("round", 0)
        ran = False
        for update in self.graph.stream(payload, self.gcfg, stream_mode="updates",
                                        context=self.ctx, durability="sync"):
            for node, writes in update.items():
                if node.startswith("__"):
                    continue
                ran = True
                # the node's round: archive and skip move the state on to the next one
                done_round = 0 if node == "baseline" else k
                crash_point(f"r{done_round}/{node}/after")
                if isinstance(writes, dict) and "round" in writes:
                    k = writes["round"]
        return ran

    def bound_graph(self) -> Any:
        """The graph with this run's context as its default context, for tooling that streams
        it without passing one (LangGraph's server through langgraph.json). LangGraph adopts a
        runtime seeded in the config as the parent of every run's own."""
        from langgraph._internal._constants import CONFIG_KEY_RUNTIME
        from langgraph.runtime import Runtime

        if self.graph.config and CONFIG_KEY_RUNTIME in (self.graph.config.get("configurable") or {}):
            return self.graph
        return self.graph.with_config({"configurable": {CONFIG_KEY_RUNTIME:
                                                        Runtime(context=self.ctx)}})


def run_loop(config: MosaicConfig, *, planner: Planner | None = None,
             fallback: Planner | None = None,
             progress: Callable[[StageEvent], None] | None = None,
             say: Callable[[str], None] | None = None,
             on_start: Callable[[str], None] | None = None) -> LoopOutcome:
    """Baseline + `config.loop.rounds` rounds in `config.run_dir`, resumable at any point.

    `on_start` is told how the run begins: "new", "resumed", "extended" or "finished".
    Raises RunBusyError when another process is running this folder, RunConfigError when the
    settings or `loop.rounds` cannot go with what already ran.
    """
    with LoopDriver(config, planner=planner, fallback=fallback, progress=progress,
                    say=say) as driver:
        how = driver.begin()
        if on_start:
            on_start(how)
        if how == "finished":
            return LoopOutcome(state=driver.values, ran=False, timings={})  # type: ignore[arg-type]
        pause = driver.advance()
        if pause is not None:  # cannot happen: only chat's review node pauses
            raise RuntimeError(f"the loop paused for a person outside chat: {pause}")
        return LoopOutcome(state=driver.values, ran=True,  # type: ignore[arg-type]
                           timings=dict(driver.ctx.timings))


@contextmanager
def make_graph(config: dict[str, Any] | None = None) -> Iterator[Any]:
    """Factory for LangGraph's own tooling (langgraph.json): the run of the config named by
    `configurable.mosaic_config` (default configs/sandbox.yaml), opened by the same driver as
    `mosaic run` -- run lock held while the graph is in use, settings checked against the run
    folder, base model resolved, start or resume logged -- with its `LoopContext` bound as the
    graph's default context (a server passes none of its own). A context manager, so the lock
    is released when the tooling is done with the graph."""
    path = ((config or {}).get("configurable") or {}).get("mosaic_config", "configs/sandbox.yaml")
    with LoopDriver(load_config(path)) as driver:
        driver.begin()
        yield driver.bound_graph()
