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
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mosaic.agents.chat import ChatInputError, LocalCommand, parse_chat_edits, parse_command
from mosaic.agents.context import StageEvent
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
        """A pause: in full when a round's action first waits (the failures the planner saw,
        the action as a compact table, the rationale once); after a command at the same pause,
        only what changed and the answer to it."""
        last = self.last_payload
        if last is None or last.get("round") != payload.get("round") \
                or last.get("summary_round") != payload.get("summary_round"):
            self._show_full(payload)
        else:
            changed = action_changes(last.get("action"), payload.get("action"))
            if changed:
                self.say(f"the action now ({payload.get('author')}): " + "; ".join(changed))
            if payload.get("rationale") and payload.get("rationale") != last.get("rationale"):
                self.say(f"why: {payload['rationale']}", "dim")  # a new proposal's reasons
            if payload.get("limits") != last.get("limits"):
                self.say(f"standing limits: {_limits_text(payload.get('limits') or {})}")
            if payload.get("message"):
                self.say(payload["message"], "yellow")
            if not changed and not payload.get("message"):
                self.say("nothing changed")
        self.last_payload = payload

    def _show_full(self, payload: dict[str, Any]) -> None:
        k = payload["round"]
        self.say(f"\n== round {k} of {payload.get('rounds')}: the action waits for you ==", "bold")
        self.say(f"failures of round {payload['summary_round']} (what the planner saw):")
        for name, s in payload["summary"].items():
            ci = s.get("ci") or [None, None]
            ci_text = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci[0] is not None else ""
            worst = ", ".join(f"{w['slice']} {w['mean']:.2f} (n {w['n']})"
                              for w in s["worst_slices"])
            self.say(f"  {name}: f = {s['f']:.3f}{ci_text} (target {s['target']}); "
                     f"worst: {worst}")
        self.say(f"proposed by {payload.get('author')}:")
        self.print_action(payload.get("action"))
        if payload.get("rationale"):
            self.say(f"why: {payload['rationale']}", "dim")
        if payload.get("limits"):
            self.say(f"standing limits: {_limits_text(payload['limits'])}")
        if payload.get("message"):
            self.say(payload["message"], "yellow")
        self.say("/approve to run it, /reject REASON, edits like /focus /mix /floor; /action "
                 "shows it again; /help")

    def print_action(self, action: dict[str, Any] | None) -> None:
        if not action:
            self.say("  (no action)")
            return
        self.console.print(action_table(action))

    # ---- the run ------------------------------------------------------------------------------------

    def run(self) -> str:
        """Drive the loop until it finishes ("finished") or the person pauses ("paused").
        Raises RunBusyError when another process is running this folder, RunConfigError when
        the settings cannot go with what already ran."""
        from langgraph.types import Command

        from mosaic.agents.runner import LoopDriver

        run_dir = self.config.run_dir
        with LoopDriver(self.config, planner=self.planner, progress=self.progress,
                        say=lambda m: self.say(f"  {m}", "dim"), review=True,
                        mode="chat") as driver:
            self.driver, self.ctx = driver, driver.ctx
            how = driver.begin()
            self.say({"new": f"starting a new run in {run_dir}",
                      "resumed": f"resuming the run in {run_dir}",
                      "extended": f"extending the finished run to {driver.rounds} rounds",
                      "finished": f"the run in {run_dir} is finished"}[how], "bold")
            payload = driver.advance()
            while payload is not None:
                if payload != self.last_payload:
                    self.show(payload)
                answer = self._ask(payload)
                if answer is None:
                    self.say(f"paused at round {payload['round']}; `mosaic chat {run_dir}` "
                             f"continues here", "bold")
                    return "paused"
                if answer:
                    payload = driver.advance(Command(resume=answer))
            self.say("the run is finished", "bold")
            self._local(LocalCommand("history"))
            return "finished"

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
            state = self.driver.values
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
            payload = self.last_payload or {}
            self.say(f"proposed by {payload.get('author')}:")
            self.print_action(payload.get("action"))
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


# ---- the pending action, compact -------------------------------------------------------------


def action_table(action: dict[str, Any]) -> Table:
    """A DataAction as one row per objective: mixture weight, bucket weights, quality threshold
    and focus (include, exclude, ratio); the action-wide method and threshold in the title."""
    title = f"method {action.get('method', 'sft')}"
    if action.get("quality_threshold") is not None:
        title += f", quality threshold {action['quality_threshold']:g}"
    table = Table(title=title, box=box.SIMPLE, title_justify="left", pad_edge=False)
    for col in ("objective", "weight", "buckets", "threshold", "focus"):
        table.add_column(col, justify="right" if col == "weight" else "left")
    per = action.get("objectives") or {}
    for name in dict.fromkeys([*(action.get("mixture") or {}), *per]):
        oa = per.get(name) or {}
        buckets = oa.get("bucket_weights")
        t = oa.get("quality_threshold")
        table.add_row(name, f"{(action.get('mixture') or {}).get(name, 0):.2f}",
                      " ".join(f"{b}={w:g}" for b, w in buckets.items()) if buckets else "-",
                      f"{t:g}" if t is not None else "-", _focus_text(oa))
    return table


def _focus_text(oa: dict[str, Any]) -> str:
    focus = oa.get("focus") or {}
    parts = [f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
             for k, v in (focus.get("include") or {}).items()]
    parts += [f"not {k}={','.join(map(str, v)) if isinstance(v, list) else v}"
              for k, v in (focus.get("exclude") or {}).items()]
    if not parts:
        return "-"
    return " ".join(parts) + (f" (ratio {oa['focus_ratio']:g})" if oa.get("focus_ratio") else "")


def action_changes(old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[str]:
    """What an edit changed in the action, one 'field: old -> new' per changed leaf."""
    def leaves(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            out: dict[str, Any] = {}
            for k, v in d.items():
                if k != "rationale":
                    out.update(leaves(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: d}

    a, b = leaves(old or {}), leaves(new or {})
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append(f"{key}: {_short(a.get(key))} -> {_short(b.get(key))}")
    return out


def _short(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


def _limits_text(limits: dict[str, Any]) -> str:
    parts = []
    for key in ("floors", "ceilings", "guards"):
        for name, v in sorted((limits.get(key) or {}).items()):
            parts.append(f"{key[:-1]} {name} {v:g}")
    if limits.get("max_change") is not None:
        parts.append(f"max change {limits['max_change']:g}")
    return ", ".join(parts) or "none"
