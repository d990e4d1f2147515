"""The LLM judge: L3 atoms from a chat model over an OpenAI-compatible endpoint.

Prompts are jinja2 templates (`prompts/judges/<type>_<channel>.j2` plus a shared system
prompt). The reply must be one JSON object holding exactly the objective type's atoms as
integers; a reply that is not gets the errors fed back for a bounded number of retries, and a
sample that still fails becomes a `JudgeFailure` record, never a silent default. Answers are
cached on disk under a hash of (model, template text, inputs), so a rerun sends no requests
(callers with a cache of their own, such as `mosaic annotate`'s per-row cache, switch it off).
`ifeval` atoms come from the programmatic checker whatever judge is configured: its
constraints are verifiable by code, and a model would only add noise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mosaic.config import EndpointConfig
from mosaic.eval.base import get_objective_type
from mosaic.eval.judge import (Channel, Conversation, JudgeBase, JudgeCapabilities, JudgeError,
                               JudgeFailure)
from mosaic.io import atomic_write_json
from mosaic.llm import (EndpointError, RetryingCaller, TokenUsage, chat_completion, make_client,
                        map_concurrently, response_format)
from mosaic.prompts import environment, render

if TYPE_CHECKING:
    import openai

log = logging.getLogger("mosaic.eval.llm_judge")

CACHE_VERSION = 1
SYSTEM_TEMPLATE = "judges/system.j2"
RETRY_TEMPLATE = "judges/retry.j2"

# Atoms that are not yes/no. Everything else the judge asks for is 0/1.
ATOM_VALUES: dict[str, tuple[int, ...]] = {"rejection_votes": (0, 1, 2)}


def _count_user_turns(conversation: Conversation) -> int:
    return sum(1 for m in conversation if m["role"] == "user")


# Atoms read off the conversation itself: asking a model to count turns only adds error.
COMPUTED_ATOMS: dict[str, Callable[[Conversation], int]] = {"turns": _count_user_turns}

def strip_fence(text: str) -> str:
    """The reply without surrounding whitespace or one surrounding markdown code fence."""
    text = text.strip()
    m = re.fullmatch(r"```[A-Za-z0-9_-]*\s*\n?(.*?)\n?\s*```", text, flags=re.DOTALL)
    return m.group(1).strip() if m else text


def parse_atoms(text: str, allowed: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, int] | None, list[str]]:
    """Strictly parse a judge reply: one JSON object, exactly the `allowed` keys, integer values
    from each key's set (JSON booleans are rejected: `true` is not `1`). Returns (atoms, errors)."""
    body = strip_fence(text)
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return None, [f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"]
    if not isinstance(obj, dict):
        return None, [f"expected a JSON object, got a JSON {type(obj).__name__}"]
    errors: list[str] = []
    missing = [k for k in allowed if k not in obj]
    extra = sorted(k for k in obj if k not in allowed)
    if missing:
        errors.append(f"missing keys: {', '.join(missing)}")
    if extra:
        errors.append(f"unexpected keys: {', '.join(extra)}")
    for key, values in allowed.items():
        if key in obj:
            v = obj[key]
            if type(v) is not int or v not in values:
                errors.append(f"{key!r} must be an integer in {{{', '.join(map(str, values))}}}, "
                              f"got {json.dumps(v)}")
    if errors:
        return None, errors
    return {k: obj[k] for k in allowed}, []


def atoms_schema(allowed: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The JSON schema of a valid reply (for servers that constrain decoding to it): exactly
    the `allowed` keys, each an integer from its set."""
    return {"type": "object", "additionalProperties": False, "required": list(allowed),
            "properties": {k: {"type": "integer", "enum": list(v)} for k, v in allowed.items()}}


class LLMJudge(JudgeBase):
    """`Judge` over an OpenAI-compatible chat endpoint, with a content-hash disk cache."""

    # One request per sample: labelling every earlier turn would multiply the requests.
    capabilities = JudgeCapabilities(per_turn=False)

    def __init__(self, endpoint: EndpointConfig, cache_dir: str | Path | None, *,
                 client: "openai.OpenAI | None" = None,
                 max_format_retries: int = 2, backoff_s: float = 0.5,
                 backoff_max_s: float = 8.0, record_endpoint_errors: bool = False) -> None:
        self.endpoint = endpoint
        self.name = f"llm:{endpoint.model}"
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.client = client if client is not None else make_client(endpoint, max_retries=0)
        self.caller = RetryingCaller(endpoint, backoff_s=backoff_s, backoff_max_s=backoff_max_s)
        self.usage = TokenUsage()
        self.max_format_retries = max_format_retries
        # False: a request that fails for good (retries spent) stops the call (evaluation needs
        # every sample). True: it becomes that sample's `JudgeFailure` (annotation lists the row
        # and goes on).
        self.record_endpoint_errors = record_endpoint_errors
        self.cache_hits = 0
        self.format_retries = 0
        self._lock = threading.Lock()  # the counters above are bumped from worker threads

    # ---- Judge interface ---------------------------------------------------------------------

    def label_responses(self, objective_type: str, conversations: Sequence[Conversation],
                        prompt_atoms: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return self._label(objective_type, "response", conversations)

    def label_prompts(self, objective_type: str,
                      conversations: Sequence[Conversation]) -> list[dict[str, Any]]:
        return self._label(objective_type, "prompt", conversations)

    def identity(self) -> dict[str, Any]:
        """What determines this judge's labels (for completion markers): model, prompts, retries."""
        env = environment()
        names = sorted(n for n in env.list_templates() if n.startswith("judges/"))
        return {"judge": self.name, "model": self.endpoint.model,
                "templates": hashlib.sha256(self._template_text(*names).encode()).hexdigest(),
                "max_format_retries": self.max_format_retries, **self._constrained()}

    def _constrained(self) -> dict[str, str]:
        # Constrained decoding changes the replies; unconstrained keys stay as they were.
        fmt = self.endpoint.response_format
        return {"response_format": fmt} if fmt != "none" else {}

    @property
    def stats(self) -> dict[str, Any]:
        return {**self.caller.stats.as_dict(), "cache_hits": self.cache_hits,
                "format_retries": self.format_retries, **self.usage.as_dict(),
                "cost": self.usage.cost(self.endpoint)}

    # ---- labelling ----------------------------------------------------------------------------

    def atom_spec(self, objective_type: str, channel: Channel) -> dict[str, tuple[int, ...]]:
        """Atoms the model must return for this type and channel, with their allowed values."""
        otype = get_objective_type(objective_type)
        names = otype.response_atoms if channel == "response" else otype.prompt_atoms
        return {a: ATOM_VALUES.get(a, (0, 1)) for a in names if a not in COMPUTED_ATOMS}

    def _template(self, objective_type: str, channel: Channel) -> str:
        name = f"judges/{objective_type}_{channel}.j2"
        if name not in environment().list_templates():
            raise ValueError(f"the LLM judge has no template for objective type {objective_type!r} "
                             f"({channel} channel): add prompts/{name}")
        return name

    def _template_text(self, *names: str) -> str:
        env = environment()
        return "\n".join(env.loader.get_source(env, n)[0] for n in names)  # type: ignore[union-attr]

    def request_messages(self, objective_type: str, channel: Channel,
                         conversation: Conversation) -> list[dict[str, str]]:
        """The chat messages one judge request sends for a conversation (`mosaic doctor`
        sends one as its probe)."""
        return self._messages(objective_type, channel, conversation,
                              self.atom_spec(objective_type, channel))

    def _messages(self, objective_type: str, channel: Channel, conversation: Conversation,
                  spec: Mapping[str, tuple[int, ...]]) -> list[dict[str, str]]:
        atoms = [{"name": k, "values": list(v)} for k, v in spec.items()]
        system = render(SYSTEM_TEMPLATE, atoms=atoms)
        conv = [{"role": m["role"], "content": m["content"]} for m in conversation]
        if channel == "response":
            user = render(self._template(objective_type, channel), context=conv[:-1],
                          response=conv[-1]["content"])
        else:
            user = render(self._template(objective_type, channel), conversation=conv)
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def cache_key(self, objective_type: str, channel: Channel, conversation: Conversation) -> str:
        template = self._template(objective_type, channel)
        payload = {
            "v": CACHE_VERSION,
            "model": self.endpoint.model,
            "templates": self._template_text(SYSTEM_TEMPLATE, template, "judges/_conversation.j2",
                                             RETRY_TEMPLATE),
            "objective_type": objective_type,
            "channel": channel,
            "atoms": {k: list(v) for k, v in self.atom_spec(objective_type, channel).items()},
            "conversation": [[m["role"], m["content"]] for m in conversation],
            "max_format_retries": self.max_format_retries,
            **self._constrained(),
        }
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()

    def _cache_path(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / key[:2] / f"{key}.json"

    def _cache_get(self, key: str, spec: Mapping[str, tuple[int, ...]]) -> dict[str, int] | None:
        if self.cache_dir is None:
            return None
        path = self._cache_path(key)
        if not path.is_file():
            return None
        try:
            atoms = json.loads(path.read_text(encoding="utf-8"))["atoms"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable judge cache entry %s (%s); it will be recomputed", path, e)
            return None
        parsed, errors = parse_atoms(json.dumps(atoms), spec)
        if errors:
            log.warning("ignoring judge cache entry %s: %s", path, "; ".join(errors))
        return parsed

    def _label(self, objective_type: str, channel: Channel,
               conversations: Sequence[Conversation]) -> list[dict[str, Any]]:
        spec = self.atom_spec(objective_type, channel)
        # Resolve the template first, so a type without one fails before any request.
        self._template(objective_type, channel)

        def one(i: int) -> dict[str, int] | JudgeFailure:
            conv = conversations[i]
            key = self.cache_key(objective_type, channel, conv)
            cached = self._cache_get(key, spec)
            if cached is not None:
                with self._lock:
                    self.cache_hits += 1
                return cached
            result = self._ask(i, objective_type, channel, conv, spec)
            if isinstance(result, dict) and self.cache_dir is not None:
                atomic_write_json(self._cache_path(key), {
                    "atoms": result, "model": self.endpoint.model,
                    "objective_type": objective_type, "channel": channel})
            return result

        results = map_concurrently(one, len(conversations), self.endpoint.concurrency,
                                   "mosaic-judge")

        out: list[dict[str, Any] | None] = []
        failures: list[JudgeFailure] = []
        for i, r in enumerate(results):
            if isinstance(r, JudgeFailure):
                failures.append(r)
                out.append(None)
            else:
                atoms: dict[str, Any] = dict(r)
                if channel == "prompt":
                    atoms.update({a: fn(conversations[i]) for a, fn in COMPUTED_ATOMS.items()
                                  if a in get_objective_type(objective_type).prompt_atoms})
                out.append(atoms)
        if failures:
            for f in failures:
                log.warning("judge failure on sample %d (%s/%s): %s", f.index, objective_type,
                            channel, "; ".join(f.errors))
            raise JudgeError(f"LLM judge {self.endpoint.model!r}", failures, out)
        return out  # type: ignore[return-value]

    def _ask(self, index: int, objective_type: str, channel: Channel, conversation: Conversation,
             spec: Mapping[str, tuple[int, ...]]) -> dict[str, int] | JudgeFailure:
        messages = self._messages(objective_type, channel, conversation, spec)
        allowed = ", ".join(f"{k}: {'/'.join(map(str, v))}" for k, v in spec.items())
        constrain = response_format(self.endpoint, f"{objective_type}_{channel}_atoms",
                                    atoms_schema(spec))
        reply, errors = "", []
        for attempt in range(self.max_format_retries + 1):
            try:
                reply = self.caller(
                    lambda: chat_completion(self.client, self.endpoint.model, messages,
                                            temperature=0.0, usage=self.usage, **constrain),
                    what=f"judge request ({objective_type}/{channel}, sample {index})")
            except EndpointError as e:
                if not self.record_endpoint_errors:
                    raise
                return JudgeFailure(index=index, objective_type=objective_type, channel=channel,
                                    errors=(str(e),), last_reply=reply, attempts=attempt + 1,
                                    reason=f"endpoint_{e.reason}")
            atoms, errors = parse_atoms(reply, spec)
            if atoms is not None:
                return atoms
            if attempt < self.max_format_retries:
                with self._lock:
                    self.format_retries += 1
                # Feed the errors back in the same conversation, so the model can correct itself.
                messages = [*messages, {"role": "assistant", "content": reply},
                            {"role": "user", "content": render(RETRY_TEMPLATE, errors=errors,
                                                               keys=list(spec), allowed=allowed)}]
        return JudgeFailure(index=index, objective_type=objective_type, channel=channel,
                            errors=tuple(errors), last_reply=reply,
                            attempts=self.max_format_retries + 1)
