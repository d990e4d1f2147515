"""The LLM planner's agent loop as a LangGraph subgraph inside the loop graph: every model reply
and tool result is a checkpoint in the run's SQLite file, so a run killed after tool calls
resumes the conversation without issuing them again (requests counted at a real chat-completions
server on 127.0.0.1), and the calls show in LangGraph's state history."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from openai_server import Text, ToolCalls

from mosaic.agents.planners.llm import LLMPlanner
from mosaic.agents.planners.llm_tools import TOOLS_BY_NAME
from mosaic.agents.runner import CHECKPOINT_FILE, THREAD_ID, run_loop
from mosaic.audit import read_log, verify_log
from mosaic.config import EndpointConfig

pytestmark = pytest.mark.slow

VALID = {"mixture": {"safety": 0.5, "boundary": 0.3, "instruction": 0.2},
         "objectives": {"boundary": {"focus": {"exclude": {"friction": ["mid", "high"]}}}},
         "method": "sft", "rationale": "more refusal data, clean boundary answers"}
FIRST = ToolCalls((("diagnose_slice", {"objective": "safety", "slice": "complexity_5"}),
                   ("pool_capacity", {"objective": "safety", "quality_threshold": 5.0})))
SECOND = ToolCalls((("dry_run_action", {"action": VALID}),))


class Crash(BaseException):
    """Stands in for a kill: not an `Exception`, so neither the SDK, the retry loop nor the
    graph turns it into a reply; it unwinds the whole run like Ctrl-C."""


def _config(tiny_run_config, tmp_path, **planner):
    return tiny_run_config.model_copy(update={
        "run_dir": str(tmp_path / "run"),
        "loop": tiny_run_config.loop.model_copy(update={"rounds": 1}),
        "planner": tiny_run_config.planner.model_copy(update=planner)})


def _endpoint(server, **kw) -> EndpointConfig:
    return EndpointConfig(base_url=server.base_url, model="planner-model", max_retries=0, **kw)


def _planner_requests(server):
    return [r for r in server.requests if (r.body or {}).get("tools")]


def _conversations(run_dir, planner: LLMPlanner):
    """Each planner conversation the run's checkpoint holds, as LangGraph's state history
    (newest first), read through the planner graph with the run's saver."""
    from langgraph.checkpoint.sqlite import SqliteSaver

    with SqliteSaver.from_conn_string(str(run_dir / CHECKPOINT_FILE)) as saver:
        namespaces = sorted({t.config["configurable"]["checkpoint_ns"] for t in saver.list(None)
                             if t.config["configurable"]["checkpoint_ns"].startswith("plan:")})
        graph = planner.build_graph(checkpointer=saver)
        return {ns: list(graph.get_state_history(
            {"configurable": {"thread_id": THREAD_ID, "checkpoint_ns": ns}}))
            for ns in namespaces}


def _crashing_client(endpoint: EndpointConfig, at: int) -> openai.OpenAI:
    """The real client whose `at`-th chat request dies before it is sent."""
    sent = {"n": 0}

    def hook(request: httpx.Request) -> None:
        if request.url.path.endswith("/chat/completions"):
            sent["n"] += 1
            if sent["n"] == at:
                raise Crash(f"killed before planner request {at}")

    return openai.OpenAI(base_url=endpoint.base_url, api_key="unused", max_retries=0,
                         timeout=endpoint.timeout_s,
                         http_client=httpx.Client(event_hooks={"request": [hook]}))


def test_tools_are_declared_once_schema_and_node_from_the_same_model():
    from mosaic.agents.planners.llm import TOOLS

    assert [t["function"]["name"] for t in TOOLS] == list(TOOLS_BY_NAME)
    for schema in TOOLS:
        tool = TOOLS_BY_NAME[schema["function"]["name"]]
        params = schema["function"]["parameters"]
        assert params["additionalProperties"] is False
        assert set(params["properties"]) == set(tool.args_schema.model_fields)
        assert set(params["required"]) == {n for n, f in tool.args_schema.model_fields.items()
                                           if f.is_required()}
    inspect = next(t for t in TOOLS if t["function"]["name"] == "inspect_examples")
    n = inspect["function"]["parameters"]["properties"]["n"]
    assert (n["minimum"], n["maximum"]) == (1, 10)
    # an optional argument is shown as its type (left out, not null), still accepted as null
    capacity = next(t for t in TOOLS if t["function"]["name"] == "pool_capacity")
    assert capacity["function"]["parameters"]["properties"]["quality_threshold"]["type"] == "number"
    assert TOOLS_BY_NAME["pool_capacity"].args_schema.model_validate(
        {"objective": "safety", "quality_threshold": None}).quality_threshold is None


def test_a_crash_after_tool_calls_resumes_the_conversation_without_reissuing_them(
        openai_server, tiny_run_config, tmp_path):
    cfg = _config(tiny_run_config, tmp_path)
    run_dir = tmp_path / "run"
    endpoint = _endpoint(openai_server, timeout_s=30)
    openai_server.push(FIRST, SECOND)
    crashing = LLMPlanner(endpoint, client=_crashing_client(endpoint, at=3), backoff_s=0.01)
    with pytest.raises(Crash):
        run_loop(cfg, planner=crashing)
    before = _planner_requests(openai_server)
    assert [r.answer for r in before] == ["tool_calls", "tool_calls"]

    # The killed conversation is in the run's checkpoint: two tool rounds, three results.
    (ns, history), = _conversations(run_dir, crashing).items()
    latest = history[0]
    assert latest.next == ("model",)
    assert [m.type for m in latest.values["messages"]] == [
        "system", "human", "ai", "tool", "tool", "ai", "tool"]
    assert [m.name for m in latest.values["messages"] if m.type == "tool"] == [
        "diagnose_slice", "pool_capacity", "dry_run_action"]

    openai_server.push(Text(json.dumps(VALID)))
    out = run_loop(cfg, planner=LLMPlanner(endpoint, backoff_s=0.01))
    after = _planner_requests(openai_server)[len(before):]
    # One request after the resume: the one that never went out, with the whole conversation
    # (both tool rounds' results) carried over from the checkpoint; no tool call re-issued.
    assert len(after) == 1
    tool_msgs = [m for m in after[0].messages if m["role"] == "tool"]
    assert len(tool_msgs) == 3 and json.loads(tool_msgs[0]["content"])["slice"] == "complexity_5"
    assert "weights_not_summing" not in tool_msgs[2]["content"]  # the dry run passed
    assert [m["role"] for m in after[0].messages] == [
        "system", "user", "assistant", "tool", "tool", "assistant", "tool"]

    assert out.state["history"][1]["author"] == "planner"
    log = read_log(run_dir)
    (proposal,) = [e["data"] for e in log if e["event"] == "proposal"]
    assert [c["name"] for c in proposal["tool_calls"]] == [
        "diagnose_slice", "pool_capacity", "dry_run_action"]
    assert all(c["result_summary"] and not c["result_summary"].startswith("error")
               for c in proposal["tool_calls"])
    assert sum(e["event"] == "run_resumed" for e in log) == 1
    assert verify_log(run_dir).ok

    # The finished conversation: one linear history in the same namespace, each tool round a
    # checkpoint of its own (the tools ran once).
    (ns2, history), = _conversations(run_dir, crashing).items()
    assert ns2 == ns
    steps = [s.next for s in reversed(history)]
    assert steps == [("__start__",), ("model",), ("tools",), ("model",), ("tools",), ("model",),
                     ()]
    assert history[0].values["raw"] == json.dumps(VALID)


def test_malformed_and_unknown_tool_calls_are_answered_with_errors_the_model_reads(
        openai_server):
    from test_heuristic_planner import context, reports

    planner = LLMPlanner(_endpoint(openai_server, timeout_s=5), backoff_s=0.01)
    openai_server.push(
        ToolCalls((("diagnose_slice", "{not json"),
                   ("no_such_tool", {"x": 1}),
                   ("pool_capacity", {"objective": "safety", "budget": 10**9}),
                   ("inspect_examples", {"objective": "safety", "n": 50}))),
        Text(json.dumps(VALID)))
    proposal = planner.propose(context(reports()))
    assert json.loads(proposal.raw) == VALID and proposal.error is None
    second = openai_server.requests[1]
    errors = [m["content"] for m in second.messages if m["role"] == "tool"]
    assert len(errors) == 4 and all("rror" in e for e in errors)  # every call is answered
    assert [c.name for c in proposal.tool_calls] == [
        "diagnose_slice", "no_such_tool", "pool_capacity", "inspect_examples"]
    summaries = [c.result_summary for c in proposal.tool_calls]
    assert all(s.startswith("error:") for s in summaries)
    assert "JSONDecodeError" in summaries[0]
    assert "no_such_tool" in summaries[1]
    assert "budget" in summaries[2]  # an argument the schema does not allow
    assert "n" in summaries[3] and "10" in summaries[3]
    # the assistant turn is repeated verbatim, malformed arguments included
    assistant = next(m for m in second.messages if m["role"] == "assistant")
    assert assistant["tool_calls"][0]["function"]["arguments"] == "{not json"


def test_a_bug_in_the_check_behind_dry_run_is_a_crash_not_a_message_to_the_model(openai_server):
    from test_heuristic_planner import FakeTools, context, reports

    class BrokenCheck(FakeTools):
        def dry_run_action(self, action):
            raise KeyError("a defect inside the check")

    planner = LLMPlanner(_endpoint(openai_server, timeout_s=5), backoff_s=0.01)
    openai_server.push(ToolCalls((("dry_run_action", {"action": VALID}),)),
                       Text(json.dumps(VALID)))
    with pytest.raises(KeyError, match="a defect inside the check"):
        planner.propose(context(reports(), tools=BrokenCheck()))
    assert len(openai_server.requests) == 1  # the model was never told the bug was its error


def test_pool_capacity_answers_a_malformed_focus_value_with_the_checks_words():
    import numpy as np
    from synthetic_pools import synthetic_eval, synthetic_pool

    from mosaic.tools.dataset.hashing import eval_prompt_hashes
    from mosaic.tools.dataset.pools import PreparedPools
    from mosaic.tools.planner_tools import pool_capacity

    pool, counts = synthetic_pool("overrefusal", 300, seed=21, objective="boundary")
    hashes = eval_prompt_hashes(synthetic_eval(pool, "overrefusal", 8, seed=31).column("messages"))
    prepared = PreparedPools({"boundary": pool}, {"boundary": "overrefusal"},
                             {"boundary": counts}, np.asarray(hashes), max_length=400)
    ok = pool_capacity(prepared, "boundary", 20_000, include={"friction": ["low"]})
    assert ok.total_tokens > 0
    for bad, words in (({"friction": 5}, "must be a non-empty list"),
                       ({"friction": [[1]]}, "is not a value of friction"),
                       ({"friction": "mid"}, "must be a non-empty list")):
        with pytest.raises(ValueError, match=words):  # a TypeError before
            pool_capacity(prepared, "boundary", 20_000, include=bad)


def test_inside_a_graph_node_each_step_streams_and_is_checkpointed_under_the_node(openai_server):
    """What LangGraph's tooling sees when a node proposes: the planner's own steps, namespaced
    under the node's task, in `stream(subgraphs=True)` and in the parent's checkpointer."""
    from typing import TypedDict

    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import END, START, StateGraph
    from test_heuristic_planner import context, reports

    planner = LLMPlanner(_endpoint(openai_server, timeout_s=5), backoff_s=0.01)
    openai_server.push(ToolCalls((("pool_capacity", {"objective": "safety"}),)),
                       Text(json.dumps(VALID)))

    class Outer(TypedDict, total=False):
        raw: str

    def plan(state: Outer) -> Outer:
        return {"raw": planner.propose(context(reports())).raw}

    outer = StateGraph(Outer)
    outer.add_node("plan", plan)
    outer.add_edge(START, "plan")
    outer.add_edge("plan", END)
    saver = InMemorySaver()
    config = {"configurable": {"thread_id": "t"}}
    events = list(outer.compile(checkpointer=saver).stream({}, config, stream_mode="updates",
                                                           subgraphs=True))
    inner = [(ns, node) for ns, update in events if ns for node in update]
    assert [node for _, node in inner] == ["model", "tools", "model"]
    (ns,) = {ns[0] for ns, _ in inner}
    assert ns.startswith("plan:")
    assert events[-1] == ((), {"plan": {"raw": json.dumps(VALID)}})
    history = list(planner.build_graph(checkpointer=saver).get_state_history(
        {"configurable": {"thread_id": "t", "checkpoint_ns": ns}}))
    tool_msgs = [m for m in history[0].values["messages"] if m.type == "tool"]
    assert [m.name for m in tool_msgs] == ["pool_capacity"] and tool_msgs[0].artifact


def test_the_tool_budget_ends_in_an_answer_request_without_tools(openai_server):
    from test_heuristic_planner import context, reports

    planner = LLMPlanner(_endpoint(openai_server, timeout_s=5), backoff_s=0.01,
                         max_tool_rounds=2)
    call = ToolCalls((("pool_capacity", {"objective": "safety"}),))
    openai_server.push(call, call, Text(json.dumps(VALID)))
    proposal = planner.propose(context(reports()))
    assert json.loads(proposal.raw) == VALID
    assert [r.body["tool_choice"] for r in openai_server.requests] == ["auto", "auto", "none"]
    assert len(proposal.tool_calls) == 2


def test_a_killed_mosaic_run_resumes_the_planner_conversation(openai_server, tiny_run_config,
                                                              tmp_path):
    """SIGKILL a real `mosaic run` while its planner waits for the reply after two tool rounds;
    `mosaic run --resume` sends that one request again and nothing before it."""
    from mosaic.config import dump_config

    run_dir = tmp_path / "run"
    cfg = _config(tiny_run_config, tmp_path, kind="llm",
                  endpoint=_endpoint(openai_server, timeout_s=300))
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(dump_config(cfg))
    gate = threading.Event()

    def held(body):
        gate.wait(600)  # the third request hangs until the process that sent it is killed
        return Text(json.dumps(VALID))

    openai_server.push(FIRST, SECOND)
    openai_server.responder = held
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mosaic", "run", str(cfg_file)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600  # only bounds a failure; no timing is asserted
        while len(_planner_requests(openai_server)) < 3:
            assert proc.poll() is None, "mosaic run ended before its third planner request"
            assert time.monotonic() < deadline, "the planner never made its third request"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        gate.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed = _planner_requests(openai_server)
    assert len(killed) == 3

    resumed = subprocess.run([sys.executable, "-m", "mosaic", "run", "--resume", str(run_dir)],
                             env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = _planner_requests(openai_server)[3:]
    assert len(after) == 1  # the request in flight, sent again; tool rounds not redone
    assert after[0].messages == killed[2].messages
    assert sum(m["role"] == "tool" for m in after[0].messages) == 3

    log = read_log(run_dir)
    (proposal,) = [e["data"] for e in log if e["event"] == "proposal"]
    assert [c["name"] for c in proposal["tool_calls"]] == [
        "diagnose_slice", "pool_capacity", "dry_run_action"]
    assert [e["data"]["status"] for e in log if e["event"] == "verdict"] == ["ok"]
    ids = [e["id"] for e in log if e["id"]]
    assert len(ids) == len(set(ids))
    assert verify_log(run_dir).ok
    (history,) = _conversations(run_dir, LLMPlanner(cfg.planner.endpoint)).values()
    assert sum(m.type == "tool" for m in history[0].values["messages"]) == 3
