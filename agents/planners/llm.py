"""The LLM planner: a chat model over any OpenAI-compatible endpoint, with function tools.

Its agent loop is a LangGraph subgraph, not a `for` loop inside one node:

    START -> model --tool calls--> tools (ToolNode) -> model ... -> answer -> END
               '--final reply------------------------------------------> END

`model` asks the endpoint with the tools offered (`tool_choice` auto); `tools` is LangGraph's
`ToolNode` over the tools of `llm_tools.py`, each declared once from a typed function; after
`max_tool_rounds` tool rounds, or when the model stops calling tools and the endpoint constrains
decoding, `answer` asks for the action itself (`tool_choice` none, the action's JSON schema).
`propose` invokes the subgraph inside the loop graph's plan node, so it inherits the run's
checkpointer: every model reply and tool result is a checkpoint in the run's SQLite file, a
killed run resumes the conversation where it stopped (completed requests and tool calls are not
issued again), and the conversation shows in LangGraph's own state history.

Tool results are JSON; examples from eval data are wrapped as UNTRUSTED data, and the system
prompt says so. Nothing the model says is trusted: the reply becomes a `Proposal` whose raw text
the graph's check validates like any other, so text from a dataset can never change the budget,
skip the check or reach the builder. A timeout, a server error after retries or a malformed reply
becomes a proposal with `error` set (and raw text the check rejects), never an exception: the
graph revises or falls back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypedDict

from langchain_core.messages import (AIMessage, AnyMessage, BaseMessage, HumanMessage,
                                     SystemMessage, ToolMessage)
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from mosaic.agents.planners.base import PlanContext
from mosaic.agents.planners.llm_tools import (PLANNER_TOOLS, PlannerRun, error_content,
                                              openai_schema, tool_error)
from mosaic.config import EndpointConfig
from mosaic.eval.base import get_objective_type
from mosaic.schemas import Proposal, ToolCall

if TYPE_CHECKING:
    import openai
    from langgraph.runtime import Runtime

log = logging.getLogger("mosaic.agents.llm_planner")

SYSTEM_TEMPLATE = "planner/system.j2"
USER_TEMPLATE = "planner/user.j2"
# Appended to the user message only when a round has several candidates (loop.candidates > 1):
# with one, the prompt and its hash are what they were before candidates existed.
CANDIDATES_TEMPLATE = "planner/candidates.j2"

# The function tools as the endpoint sees them, made from the same declarations ToolNode runs.
TOOLS: list[dict[str, Any]] = [openai_schema(t) for t in PLANNER_TOOLS]


# Tokens of a schema-constrained answer: an action is a few hundred; a small model kept inside
# a grammar can otherwise write digits or rationale until the context ends.
ANSWER_MAX_TOKENS = 1024


def action_schema(ctx: PlanContext) -> dict[str, Any]:
    """The data action's JSON schema narrowed to this run's objectives (for servers that
    constrain decoding): the mixture names each of them once. The check still validates
    everything the schema cannot say (sums, slices, focus keys, capacity, limits)."""
    from mosaic.schemas import DataAction

    schema = DataAction.model_json_schema()
    names = list(ctx.objectives)
    props = schema["properties"]
    props["mixture"] = {"type": "object", "additionalProperties": False, "required": names,
                        "properties": {n: {"type": "number", "minimum": 0, "maximum": 1}
                                       for n in names}}
    props["objectives"] = {"type": "object", "additionalProperties": False,
                           "properties": {n: {"$ref": "#/$defs/ObjectiveAction"} for n in names}}
    props["rationale"] = {"type": "string", "maxLength": 600}
    schema["required"] = ["mixture", "rationale"]
    return schema


def _extract_action(text: str) -> str:
    """The reply's JSON object: the whole reply, or the one inside a code fence, or the span from
    the first '{' to the last '}'. What comes back is still only text for the check."""
    text = text.strip()
    fenced = re.fullmatch(r"```[A-Za-z0-9_-]*\s*\n?(.*?)\n?\s*```", text, flags=re.DOTALL)
    if fenced:
        return fenced.group(1).strip()
    if text.startswith("{"):
        return text
    start, end = text.find("{"), text.rfind("}")
    return text[start:end + 1] if 0 <= start < end else text


def _templates_hash(candidates: bool = False) -> str:
    from mosaic.prompts import environment

    env = environment()
    names = (SYSTEM_TEMPLATE, USER_TEMPLATE, "reports/failure_report.j2",
             *((CANDIDATES_TEMPLATE,) if candidates else ()))
    text = "\n".join(env.loader.get_source(env, n)[0]  # type: ignore[union-attr]
                     for n in names)
    return hashlib.sha256(text.encode()).hexdigest()


class PlannerState(TypedDict, total=False):
    """The planner subgraph's checkpointed state: the conversation and where it ended."""

    messages: Annotated[list[AnyMessage], add_messages]
    tool_rounds: int  # model replies that called tools so far
    raw: str | None  # the answer's action text, once there is one
    error: str | None  # why no usable reply came back (the conversation ends there)


def _ai_message(message: Any) -> tuple[AIMessage, list[ToolMessage]]:
    """An OpenAI reply message as a LangChain `AIMessage` (the wire form of its tool calls kept,
    so the next request repeats them verbatim), and error answers for calls whose arguments are
    not a JSON object: those cannot run, and the model is told so at once."""
    raw_calls, valid, invalid, errors = [], [], [], []
    for c in getattr(message, "tool_calls", None) or []:
        name, text = c.function.name, c.function.arguments or "{}"
        raw_calls.append({"id": c.id, "type": "function",
                          "function": {"name": name, "arguments": c.function.arguments}})
        try:
            args = json.loads(text)
            if not isinstance(args, dict):
                raise ValueError("arguments must be a JSON object")
        except ValueError as e:
            invalid.append({"name": name, "args": text, "id": c.id, "error": str(e),
                            "type": "invalid_tool_call"})
            errors.append(ToolMessage(error_content(f"{type(e).__name__}: {e}"),
                                      tool_call_id=c.id, name=name, status="error"))
            continue
        valid.append({"name": name, "args": args, "id": c.id, "type": "tool_call"})
    extra = {"tool_calls": raw_calls} if raw_calls else {}
    return (AIMessage(content=message.content or "", tool_calls=valid, invalid_tool_calls=invalid,
                      additional_kwargs=extra), errors)


def _wire(message: BaseMessage) -> dict[str, Any]:
    """A conversation message as the chat-completions request carries it."""
    if isinstance(message, SystemMessage):
        return {"role": "system", "content": message.content}
    if isinstance(message, HumanMessage):
        return {"role": "user", "content": message.content}
    if isinstance(message, ToolMessage):
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    if isinstance(message, AIMessage):
        out: dict[str, Any] = {"role": "assistant", "content": message.content or ""}
        if message.additional_kwargs.get("tool_calls"):
            out["tool_calls"] = message.additional_kwargs["tool_calls"]
        return out
    raise TypeError(f"unexpected message type {type(message).__name__}")


def _calls_made(messages: list[AnyMessage]) -> bool:
    return any(isinstance(m, AIMessage) and m.additional_kwargs.get("tool_calls")
               for m in messages)


def tool_calls_of(messages: list[AnyMessage]) -> list[ToolCall]:
    """The conversation's tool calls in the order the model made them, each with the summary
    of its result (or its error) for the audit log."""
    results = {m.tool_call_id: m for m in messages if isinstance(m, ToolMessage)}
    calls = []
    for m in messages:
        if not isinstance(m, AIMessage):
            continue
        parsed = {c["id"]: c["args"] for c in m.tool_calls}
        for c in m.additional_kwargs.get("tool_calls") or []:
            result = results.get(c["id"])
            if result is None:
                summary = "error: no result"  # cannot happen: every call is answered
            elif result.status == "error":
                try:
                    summary = "error: " + json.loads(result.content)["error"]
                except (ValueError, KeyError, TypeError):
                    summary = f"error: {result.content}"
                summary = summary[:400]
            else:
                summary = str(result.artifact or "")
            calls.append(ToolCall(name=c["function"]["name"], arguments=parsed.get(c["id"], {}),
                                  result_summary=summary))
    return calls


class LLMPlanner:
    """`Planner` over an OpenAI-compatible chat endpoint with tool calls."""

    name = "llm"

    def __init__(self, endpoint: EndpointConfig, *, client: "openai.OpenAI | None" = None,
                 max_tool_rounds: int = 6, backoff_s: float = 0.5) -> None:
        from mosaic.llm import RetryingCaller, make_client

        self.endpoint = endpoint
        self.client = client if client is not None else make_client(endpoint, max_retries=0)
        self.caller = RetryingCaller(endpoint, backoff_s=backoff_s)
        self.max_tool_rounds = max_tool_rounds
        self.graph = self.build_graph()

    def messages(self, ctx: PlanContext) -> list[dict[str, Any]]:
        from mosaic.eval.report import render_failure_report
        from mosaic.prompts import render

        objectives = {}
        for name, type_name in ctx.objectives.items():
            otype = get_objective_type(type_name)
            objectives[name] = {"type": type_name, "slices": list(otype.slices),
                                "focus_keys": sorted(otype.focus_keys)}
        system = render(SYSTEM_TEMPLATE, objectives=objectives, budget=ctx.budget,
                        max_tool_rounds=self.max_tool_rounds)
        front = ctx.archive.front if ctx.archive is not None else []
        previous = (json.dumps(ctx.previous_action.model_dump(mode="json", exclude_defaults=True),
                               sort_keys=True) if ctx.previous_action is not None else None)
        user = render(USER_TEMPLATE, round=ctx.round, rounds=ctx.rounds, budget=ctx.budget,
                      targets=ctx.targets, history=ctx.history, front=front,
                      reports=[render_failure_report(r) for r in ctx.reports.values()],
                      reports_round=ctx.reports_round, limits=ctx.limits,
                      previous_action=previous, feedback=ctx.feedback, notes=ctx.notes)
        if ctx.candidates > 1:
            # The earlier candidates of this round, so the model proposes another trade-off.
            user += "\n\n" + render(CANDIDATES_TEMPLATE, round=ctx.round,
                                     candidate=ctx.candidate + 1, candidates=ctx.candidates,
                                     earlier=ctx.earlier_candidates)
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    # ---- the subgraph ---------------------------------------------------------------------------

    def build_graph(self, *, checkpointer: Any = None) -> Any:
        """The planner's agent loop as a compiled LangGraph graph. With no checkpointer of its
        own (the default) it uses the loop's when invoked inside the plan node; pass the run's
        saver to read a conversation back (`get_state_history` with the plan task's
        `checkpoint_ns`)."""
        from langgraph.prebuilt import ToolNode

        g = StateGraph(PlannerState, context_schema=PlannerRun)
        g.add_node("model", self._model)
        g.add_node("tools", ToolNode(PLANNER_TOOLS, handle_tool_errors=tool_error))
        g.add_node("answer", self._answer)
        g.add_conditional_edges(START, self._after_tools, {"model": "model", "answer": "answer"})
        g.add_conditional_edges("model", self._after_model,
                                {"tools": "tools", "model": "model", "answer": "answer", END: END})
        g.add_conditional_edges("tools", self._after_tools, {"model": "model", "answer": "answer"})
        g.add_edge("answer", END)
        return g.compile(checkpointer=checkpointer, name="llm_planner")

    def _ask(self, run: PlannerRun, messages: list[AnyMessage], *, answer: bool) -> Any:
        from mosaic.llm import chat_message

        # The answer request forbids tool calls and, where the endpoint constrains decoding,
        # asks for the action's schema (servers apply it only without tool choice "auto").
        extra: dict[str, Any] = ({"tool_choice": "none", **run.constrain} if answer
                                 else {"tool_choice": "auto"})
        if answer and run.constrain:
            extra["max_tokens"] = ANSWER_MAX_TOKENS
        wire = [_wire(m) for m in messages]
        return self.caller(lambda: chat_message(
            self.client, self.endpoint.model, wire, temperature=0.0, tools=TOOLS, **extra),
            what=f"planner request (round {run.plan.round})")

    def _model(self, state: PlannerState, runtime: "Runtime[PlannerRun]") -> dict[str, Any]:
        """One request with the tools offered."""
        from mosaic.llm import EndpointError, MalformedResponse

        try:
            message = self._ask(runtime.context, state["messages"], answer=False)
        except (EndpointError, MalformedResponse) as e:
            return {"error": str(e)}
        ai, errors = _ai_message(message)
        update: dict[str, Any] = {"messages": [ai, *errors]}
        if ai.additional_kwargs.get("tool_calls"):
            update["tool_rounds"] = state.get("tool_rounds", 0) + 1
        elif not runtime.context.constrain:
            update["raw"] = _extract_action(ai.content if isinstance(ai.content, str) else "")
        return update

    def _answer(self, state: PlannerState, runtime: "Runtime[PlannerRun]") -> dict[str, Any]:
        """The final request: the action itself, no tools, under the schema where constrained."""
        from mosaic.llm import EndpointError, MalformedResponse

        # A prose reply that ended the tool calls is asked again, not answered: the request
        # is the conversation up to it.
        messages = list(state["messages"])
        while messages and isinstance(messages[-1], AIMessage) and not messages[-1].tool_calls \
                and not messages[-1].additional_kwargs.get("tool_calls"):
            messages.pop()
        try:
            message = self._ask(runtime.context, messages, answer=True)
        except (EndpointError, MalformedResponse) as e:
            return {"error": str(e)}
        content = message.content or ""
        return {"messages": [AIMessage(content=content)], "raw": _extract_action(content)}

    def _after_model(self, state: PlannerState) -> Literal["tools", "model", "answer", "__end__"]:
        if state.get("error") is not None or state.get("raw") is not None:
            return END
        last = next(m for m in reversed(state["messages"]) if isinstance(m, AIMessage))
        if last.tool_calls:
            return "tools"
        if last.invalid_tool_calls:  # only malformed calls: already answered with errors
            return self._after_tools(state)
        return "answer"  # done with tools: ask for the action under the schema

    def _after_tools(self, state: PlannerState) -> Literal["model", "answer"]:
        # Loop counter against the configured maximum: the last request forbids tools.
        return "model" if state.get("tool_rounds", 0) < self.max_tool_rounds else "answer"

    # ---- the planner interface ------------------------------------------------------------------

    def propose(self, ctx: PlanContext) -> Proposal:
        from mosaic.llm import response_format

        meta = {"planner": self.name, "model": self.endpoint.model,
                "prompt_hash": _templates_hash(candidates=ctx.candidates > 1)}
        run = PlannerRun(plan=ctx, constrain=response_format(self.endpoint, "data_action",
                                                             action_schema(ctx)))
        system, user = self.messages(ctx)
        inputs: PlannerState = {"messages": [SystemMessage(system["content"]),
                                             HumanMessage(user["content"])], "tool_rounds": 0}
        # Two steps a tool round plus the answer; the limit only guards against a wiring bug.
        config = {"recursion_limit": 2 * self.max_tool_rounds + 8}
        extra = {"durability": "sync"} if _in_checkpointed_graph() else {}
        final = self.graph.invoke(inputs, config, context=run, **extra)
        calls = tool_calls_of(final["messages"])
        if final.get("error") is not None:
            return Proposal(raw="", tool_calls=calls, error=final["error"], **meta)
        raw = final.get("raw") or ""
        rationale = ""
        try:
            parsed = json.loads(raw)
            if isinstance(parsed, dict) and isinstance(parsed.get("rationale"), str):
                rationale = parsed["rationale"]
        except ValueError:
            pass  # the check reports malformed JSON to the planner
        return Proposal(raw=raw, tool_calls=calls, rationale=rationale, **meta)


def _in_checkpointed_graph() -> bool:
    """Whether `propose` runs inside a graph node with a checkpointer (the loop's plan node).
    There every step of the conversation is saved before the next request goes out
    (durability "sync"), so a kill never loses a tool call that finished."""
    from langgraph.config import get_config
    from langgraph.constants import CONF, CONFIG_KEY_CHECKPOINTER

    try:
        config = get_config()
    except RuntimeError:
        return False
    return config.get(CONF, {}).get(CONFIG_KEY_CHECKPOINTER) is not None
