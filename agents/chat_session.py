"""`mosaic chat`: the loop with a person at every pause, driven line by line.

The graph runs with `review=True`, so before each action executes its review node calls
LangGraph's `interrupt()`; the pause lives in the run's SQLite checkpoint, so closing the
terminal (or `/quit`) and starting `mosaic chat RUN_DIR` again returns to the same pause. Each
line is a slash command (`agents/chat.py`, always offline) or, when `chat.endpoint` is set,
free text that the chat model turns into the same typed edits, shown before they apply. Edits
reach the graph as `Command(resume=...)`; the review node checks them like any proposal and
logs them with author `human`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from mosaic.agents.chat import ChatInputError, LocalCommand, parse_chat_edits, parse_command
from mosaic.agents.context import LoopContext, StageEvent
from mosaic.agents.planners.base import Planner
from mosaic.config import MosaicConfig
from mosaic.schemas import ChatEdit

ReadLine = Callable[[str], str | None]  # prompt -> line, or None at end of input


class ChatSession:
    def __init__(self, config: MosaicConfig, *, read_line: ReadLine, console: Console,
                 planner: Planner | None = None, echo: bool = False,
                 chat_client: Any = None) -> None:
        self.config = config
        self.read_line = read_line
        self.console = console
        self.planner = planner
        self.echo = echo  # print each scripted line (stdin is not a terminal)
        self.chat_client = chat_client
        self.last_payload: dict[str, Any] | None = None

    # ---- output -----------------------------------------------------------------------------------

    def say(self, text: str, style: str = "") -> None:
        self.console.print(Text(text, style=style))

    def progress(self, e: StageEvent) -> None:
        if e.status == "done":
            where = "baseline" if e.round == 0 else f"round {e.round}"
            self.say(f"  {where}: {e.stage} done in {e.seconds:.1f}s", "dim")

    def show(self, payload: dict[str, Any]) -> None:
        k = payload["round"]
        self.say(f"\n== round {k} of {payload.get('rounds')}: the action waits for you ==", "bold")
        self.say(f"failures of round {payload['summary_round']} (what the planner saw):")
        for name, s in payload["summary"].items():
            ci = s.get("ci") or [None, None]
            ci_text = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci[0] is not None else ""
            self.say(f"  {name}: f = {s['f']:.3f}{ci_text} (target {s['target']})")
            for w in s["worst_slices"]:
                wci = w["ci"] if w["ci"][0] is not None else None
                self.say(f"    {w['slice']}: mean {w['mean']:.2f}"
                         + (f" [{wci[0]:.2f}, {wci[1]:.2f}]" if wci else "")
                         + f", n {w['n']}, {w['reliability']} reliability, need {w['need']:.1f}")
        self.say(f"proposed by {payload.get('author')}: "
                 + json.dumps(payload.get("action"), sort_keys=True))
        if payload.get("rationale"):
            self.say(f"why: {payload['rationale']}", "dim")
        if payload.get("limits"):
            self.say(f"standing limits: {json.dumps(payload['limits'], sort_keys=True)}")
        if payload.get("message"):
            self.say(payload["message"], "yellow")
        self.say("/approve to run it, /reject REASON, edits like /focus /mix /floor; /help")

    # ---- the run ------------------------------------------------------------------------------------

    def run(self) -> str:
        """Drive the loop until it finishes ("finished") or the person pauses ("paused").
        Raises RunBusyError when another process is running this folder."""
        from mosaic.run_store import run_lock

        with run_lock(self.config.run_dir):
            return self._run_locked()

    def _run_locked(self) -> str:
        from langgraph.types import Command

        from mosaic.agents.planners import make_planner
        from mosaic.agents.planners.heuristic import HeuristicPlanner
        from mosaic.agents.runner import graph_config, open_checkpointer
        from mosaic.agents.graph import build_graph
        from mosaic.audit import AuditLog
        from mosaic.eval import check_objective_types
        from mosaic.run_store import open_run

        cfg = self.config
        check_objective_types(cfg)
        open_run(cfg)
        run_dir = Path(cfg.run_dir)
        audit = AuditLog(run_dir)
        planner = self.planner or make_planner(cfg)
        fallback = planner if isinstance(planner, HeuristicPlanner) else HeuristicPlanner()
        self.ctx = LoopContext(config=cfg, run_dir=run_dir, planner=planner, fallback=fallback,
                               audit=audit, progress=self.progress,
                               say=lambda m: self.say(f"  {m}", "dim"), review=True)
        gcfg = graph_config(cfg.loop.rounds)
        with open_checkpointer(run_dir) as saver:
            self.graph = graph = build_graph(self.ctx, checkpointer=saver)
            snap = graph.get_state(gcfg)
            values = dict(snap.values or {})
            if not values:
                self.say(f"starting a new run in {run_dir}", "bold")
                audit.append("run_started", {"rounds": cfg.loop.rounds, "planner": planner.name,
                                             "mode": "chat"})
                self._stream({"rounds": cfg.loop.rounds, "history": [], "round": 0}, gcfg)
            elif values.get("finished") and cfg.loop.rounds > values.get("rounds", 0):
                self.say(f"extending the finished run to {cfg.loop.rounds} rounds", "bold")
                graph.update_state(gcfg, {"rounds": cfg.loop.rounds, "finished": False},
                                   as_node="archive")
                audit.append("run_resumed", {"extended_to": cfg.loop.rounds, "mode": "chat"})
                self._stream(None, gcfg)
            else:
                audit.append("run_resumed", {"at": list(snap.next), "mode": "chat"})
            while True:
                snap = graph.get_state(gcfg)
                if snap.interrupts:
                    payload = snap.interrupts[0].value
                    if payload != self.last_payload:
                        self.show(payload)
                        self.last_payload = payload
                    answer = self._ask(payload)
                    if answer is None:
                        self.say(f"paused at round {payload['round']}; `mosaic chat {run_dir}` "
                                 f"continues here", "bold")
                        return "paused"
                    if answer:
                        self._stream(Command(resume=answer), gcfg)
                elif snap.next:
                    self._stream(None, gcfg)  # a run that stopped between nodes goes on
                else:
                    self.say("the run is finished", "bold")
                    self._local(LocalCommand("history"))
                    return "finished"

    def _stream(self, payload: Any, gcfg: dict[str, Any]) -> None:
        for _ in self.graph.stream(payload, gcfg, stream_mode="updates"):
            pass

    def _ask(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        """The person's next answer for the graph; {} after a local command; None to pause."""
        line = self.read_line(f"round {payload['round']}> ")
        if line is None:
            return None
        line = line.strip()
        if self.echo and line:
            self.say(f"> {line}", "cyan")
        if not line:
            return {}
        try:
            if line.startswith("/"):
                parsed = parse_command(line)
                if isinstance(parsed, LocalCommand):
                    return None if parsed.name == "quit" else self._local(parsed) or {}
                return {"edits": [parsed.model_dump()], "text": line}
            edits = self._translate(line, payload)
        except ChatInputError as e:
            self.say(str(e), "red")
            return {}
        if not edits:
            return {}
        self.say("that is: " + "; ".join(e.command() for e in edits))
        confirm = self.read_line("apply? [y/N] ")
        if self.echo and confirm is not None:
            self.say(f"> {confirm}", "cyan")
        if confirm is None or confirm.strip().lower() not in ("y", "yes"):
            self.say("not applied")
            return {}
        return {"edits": [e.model_dump() for e in edits], "text": line}

    def _translate(self, line: str, payload: dict[str, Any]) -> list[ChatEdit]:
        ep = self.config.chat.endpoint
        if ep is None:
            raise ChatInputError("free text needs a chat model (chat.endpoint in the config); "
                                 "slash commands always work: /help")
        from mosaic.eval.base import get_objective_type
        from mosaic.llm import EndpointError, MalformedResponse, RetryingCaller, chat_completion, make_client
        from mosaic.prompts import render

        objectives = {}
        for name, o in self.config.objectives.items():
            otype = get_objective_type(o.type)
            objectives[name] = {"type": o.type, "slices": list(otype.slices),
                                "focus_keys": sorted(otype.focus_keys)}
        system = render("chat/translate.j2", objectives=objectives,
                        action=json.dumps(payload.get("action"), sort_keys=True),
                        limits=payload.get("limits") or {})
        client = self.chat_client or make_client(ep, max_retries=0)
        try:
            reply = RetryingCaller(ep)(lambda: chat_completion(
                client, ep.model, [{"role": "system", "content": system},
                                   {"role": "user", "content": line}], temperature=0.0),
                what="chat request")
        except (EndpointError, MalformedResponse) as e:
            raise ChatInputError(f"the chat model did not answer: {e}") from None
        return parse_chat_edits(reply)

    # ---- local commands ----------------------------------------------------------------------------

    def _local(self, cmd: LocalCommand) -> None:
        from mosaic.display import pareto_table, rounds_table
        from mosaic.tools.archive import load_archive

        ctx = self.ctx
        wide = Console(width=max(self.console.width, 140), file=self.console.file, emoji=False)
        if cmd.name == "help":
            from mosaic.agents import chat

            self.say(chat.__doc__.split("Slash commands", 1)[1].split("\n", 1)[1].rstrip())
        elif cmd.name == "history":
            state = self.graph.get_state(_gcfg(self)).values
            archive = load_archive(ctx.run_dir)
            wide.print(rounds_table(state.get("history", []), list(self.config.objectives),
                                    archive.front if archive else ()))
        elif cmd.name == "pareto":
            archive = load_archive(ctx.run_dir)
            if archive is None:
                self.say("no archive yet")
            else:
                wide.print(pareto_table(archive))
        elif cmd.name == "action":
            self.say(json.dumps((self.last_payload or {}).get("action"), indent=2, sort_keys=True))
        elif cmd.name in ("show", "examples"):
            self._inspect(cmd)

    def _inspect(self, cmd: LocalCommand) -> None:
        from mosaic.tools.planner_tools import diagnose_slice, inspect_examples

        args = list(cmd.args)
        if cmd.name == "show" and args[:1] == ["slice"]:
            args = args[1:]
        if len(args) < 2:
            self.say(f"/{cmd.name} {'slice ' if cmd.name == 'show' else ''}OBJECTIVE SLICE"
                     + (" [failed|passed]" if cmd.name == "examples" else ""), "red")
            return
        name, slice_ = args[0], args[1]
        k = (self.last_payload or {}).get("summary_round", 0)
        report = self.ctx.eval_report(k)
        if report is None or name not in report.reports:
            self.say(f"no eval report for {name!r} in round {k}; objectives: "
                     f"{', '.join(self.config.objectives)}", "red")
            return
        try:
            if cmd.name == "show":
                d = diagnose_slice(report.reports[name], slice_,
                                   eval_dir=self.ctx.round_dir(k) / "eval")
                self.say(json.dumps(d.model_dump(mode="json"), indent=2))
            else:
                which = args[2] if len(args) > 2 else "failed"
                for ex in inspect_examples(self.ctx.round_dir(k) / "eval", name, slice=slice_,
                                           which=which, n=3):  # type: ignore[arg-type]
                    self.say(f"- {ex.id} score {ex.score:g} ({ex.turns} turns)")
                    self.say(f"  user: {ex.prompt_excerpt}")
                    self.say(f"  model: {ex.response_excerpt}")
        except ValueError as e:
            self.say(str(e), "red")


def _gcfg(session: ChatSession) -> dict[str, Any]:
    from mosaic.agents.runner import graph_config

    return graph_config(session.config.loop.rounds)
