"""A scripted LLM judge behind the scripted OpenAI server, with faults on request.

`JudgeScript` answers every judge request with valid atoms read off the request itself (the
system prompt lists the atoms and their values; the values follow a hash of the conversation, so
a rerun gets the same atoms), and injects faults by content: a conversation whose text holds
`[fault:429]`, `[fault:500]`, `[fault:timeout]`, `[fault:body]` (a 200 whose body is not JSON)
or `[fault:reply]` (a reply that is not JSON) gets that fault on its first request and a valid
answer after, and `[fault:always500]` fails every time. Used by tests/test_annotate.py and
bench/annotate_bench.py.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from typing import Any

from openai_server import Raw, Status, Text

ATOM = re.compile(r'^- "(\w+)": one of ([0-9, ]+)$', re.MULTILINE)
FAULT = re.compile(r"\[fault:(\w+)\]")


def conversation_text(body: dict[str, Any]) -> str:
    """The judged text of a request: its user message (chat) or its prompt (completions)."""
    if "prompt" in body:
        return str(body["prompt"])
    users = [m.get("content") or "" for m in body.get("messages", []) if m.get("role") == "user"]
    return users[0] if users else ""


def atoms_for(body: dict[str, Any]) -> dict[str, int]:
    """Valid atoms for a judge request: each listed atom, valued by a hash of the text."""
    system = body["messages"][0]["content"]
    text = conversation_text(body)
    out = {}
    for name, values in ATOM.findall(system):
        allowed = [int(v) for v in values.split(",")]
        h = int(hashlib.sha256(f"{name}:{text}".encode()).hexdigest()[:8], 16)
        out[name] = allowed[h % len(allowed)]
    return out


class JudgeScript:
    """`responder` for ScriptedOpenAIServer: valid atoms, and each marked fault once."""

    def __init__(self, timeout_delay_s: float = 1.0, latency_s: float = 0.0) -> None:
        self.timeout_delay_s = timeout_delay_s
        self.latency_s = latency_s  # every answer waits this long (a model's inference time)
        self.faults: Counter[str] = Counter()  # faults served, by kind
        self._served: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> Any:
        if self.latency_s:
            time.sleep(self.latency_s)
        if not body.get("messages") and "prompt" not in body:
            # A request cut off mid-send (its client was killed) has no readable body.
            return Status(400, "unreadable request body")
        text = conversation_text(body)
        is_retry = len(body.get("messages", [])) > 2  # a format retry carries the bad reply
        for kind in FAULT.findall(text):
            if kind == "always500":
                with self._lock:
                    self.faults[kind] += 1
                return Status(500, "scripted outage")
            key = (kind, hashlib.sha256(text.encode()).hexdigest())
            with self._lock:
                if key in self._served or is_retry:
                    continue
                self._served.add(key)
                self.faults[kind] += 1
            if kind == "429":
                return Status(429, "slow down", retry_after=0.05)
            if kind == "500":
                return Status(500, "scripted server error", echo_headers=True)
            if kind == "timeout":
                return Text(json.dumps(atoms_for(body)), delay_s=self.timeout_delay_s)
            if kind == "body":
                return Raw("{this is not json")
            if kind == "reply":
                return Text("Sure! The atoms are: all zero.")
        return Text(json.dumps(atoms_for(body)))


# ---- what a killed-and-resumed annotation asked about --------------------------------------
# Pools whose row i replies to prompt i // 2 with "final reply {i}" after "request {i // 2}
# turn 0 ..." (tests/test_annotate.py, bench/annotate_bench.py).


def cached_conversations(done: Any, cached: set[str], identity: dict[str, Any]) -> tuple[set[int], set[int]]:
    """(prompts, rows) of an annotated pool frame whose prompt / reply atoms are in `cached`
    (cache keys from mosaic.eval.annotate.atom_key)."""
    from mosaic.eval.annotate import atom_key, prompt_part

    convs = [[dict(m) for m in c] for c in done["messages"]]
    atoms = [json.loads(a) if isinstance(a, str) else None for a in done["l3_prompt"]]
    prompts = {i // 2 for i in range(len(convs))
               if atom_key(identity, "jailbreak", "prompt", prompt_part(convs[i])) in cached}
    rows = {i for i in range(len(convs)) if atoms[i] is not None
            and atom_key(identity, "jailbreak", "response", convs[i], atoms[i]) in cached}
    return prompts, rows


def asked_conversations(requests: Any) -> tuple[set[int], set[int]]:
    """(prompts, rows) that judge requests asked about."""
    prompts, rows = set(), set()
    for r in requests:
        text = conversation_text(r.body or {})
        if "FINAL assistant reply" in text:
            rows.add(int(re.search(r"final reply (\d+)", text).group(1)))
        else:
            prompts.add(int(re.search(r"request (\d+) turn 0", text).group(1)))
    return prompts, rows
