"""Chat steering, the pure part: slash commands -> typed `ChatEdit`s -> a new action or new
standing limits. Nothing here trusts its input: an edited action goes through the same check as
a planner's proposal (in the review node), and limit edits are validated here with messages
that name the problem.

Slash commands (always available, offline):

    /approve                               run the action as it stands
    /reject REASON                         send it back to the planner with the reason
    /mix safety=0.5 boundary=0.3 ...       mixture weights
    /buckets OBJ slice=w slice=w ...       bucket weights of one objective
    /focus OBJ KEY=v1,v2                   add an include criterion
    /exclude OBJ KEY=v1,v2                 add an exclude criterion
    /ratio OBJ X                           focus_ratio of an objective
    /threshold [OBJ] X|none                quality threshold (of one objective, or the action's)
    /method [OBJ] sft|dpo|sft+dpo          training method (of one objective, or the action's)
    /floor OBJ X  /ceiling OBJ X  /maxchange X      standing limits (bind the planner too)
    /guard OBJ X                           never accept a round whose OBJ score falls below X
    /clearlimits                           drop the standing limits set in chat
    /note TEXT                             standing guidance shown to the planner
    /show slice OBJ SLICE  /examples OBJ SLICE [failed|passed]
    /history  /pareto  /help  /quit        (/quit pauses; the run resumes there later)
"""

from __future__ import annotations

import copy
import json
import math
import shlex
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from mosaic.chat_input import free_text_command, input_problem
from mosaic.schemas import ChatEdit

ACTION_OPS = ("mix", "buckets", "focus", "exclude", "ratio", "threshold", "method")
LIMIT_OPS = ("floor", "ceiling", "max_change", "guard", "clear_limits")
LOCAL = ("help", "history", "pareto", "quit", "show", "examples", "action")


class ChatInputError(ValueError):
    """A line the chat cannot read; the message says what was expected."""


@dataclass(frozen=True)
class LocalCommand:
    """A command answered by the chat itself, without touching the run."""

    name: str
    args: tuple[str, ...] = ()


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ChatInputError(f"{what} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ChatInputError(f"{what} must be a finite number, got {text!r}")
    return value


def _weights(parts: list[str], what: str) -> dict[str, float]:
    if not parts:
        raise ChatInputError(f"{what}: give name=weight pairs, e.g. safety=0.5 boundary=0.5")
    out = {}
    for p in parts:
        if "=" not in p:
            raise ChatInputError(f"{what}: {p!r} is not name=weight")
        name, value = p.split("=", 1)
        out[name] = _number(value, f"{what} weight of {name!r}")
    return out


def _value(v: str) -> str | int:
    return int(v) if v.lstrip("-").isdigit() else v


def parse_command(line: str) -> ChatEdit | LocalCommand:
    """One slash command as a typed edit or a local command; raises ChatInputError."""
    problem = input_problem(line)
    if problem:
        raise ChatInputError(problem)
    free = free_text_command(line)  # /note and /reject take their text as typed
    if free is not None:
        cmd, text = free
        if not text:
            raise ChatInputError(f"/{cmd} needs a text, e.g. /{cmd} too much safety data")
        return ChatEdit(op=cmd, text=text)
    try:
        words = shlex.split(line.strip())
    except ValueError as e:
        raise ChatInputError(f"cannot read {line!r}: {e}") from None
    if not words or not words[0].startswith("/"):
        raise ChatInputError("commands start with '/'; /help lists them")
    cmd, args = words[0][1:].lower(), words[1:]
    if cmd in LOCAL:
        return LocalCommand(cmd, tuple(args))
    if cmd in ("approve", "ok", "yes"):
        return ChatEdit(op="approve")
    if cmd in ("reject", "note"):
        if not args:
            raise ChatInputError(f"/{cmd} needs a text, e.g. /{cmd} too much safety data")
        return ChatEdit(op=cmd, text=" ".join(args))
    if cmd == "mix":
        return ChatEdit(op="mix", weights=_weights(args, "/mix"))
    if cmd == "buckets":
        if len(args) < 2:
            raise ChatInputError("/buckets OBJECTIVE slice=weight ...")
        return ChatEdit(op="buckets", objective=args[0], weights=_weights(args[1:], "/buckets"))
    if cmd in ("focus", "exclude"):
        if len(args) != 2 or "=" not in args[1]:
            raise ChatInputError(f"/{cmd} OBJECTIVE KEY=value1,value2 "
                                 f"(e.g. /{cmd} safety pc_patterns=P4_C3,P5_C3)")
        key, values = args[1].split("=", 1)
        vals = [_value(v) for v in values.split(",") if v]
        if not vals:
            raise ChatInputError(f"/{cmd}: {key} needs at least one value")
        return ChatEdit(op=cmd, objective=args[0], key=key, values=vals)
    if cmd == "ratio":
        if len(args) != 2:
            raise ChatInputError("/ratio OBJECTIVE X (the focus_ratio, 0-1)")
        return ChatEdit(op="ratio", objective=args[0], value=_number(args[1], "/ratio"))
    if cmd == "threshold":
        if len(args) not in (1, 2):
            raise ChatInputError("/threshold [OBJECTIVE] X|none")
        obj = args[0] if len(args) == 2 else None
        raw = args[-1]
        return ChatEdit(op="threshold", objective=obj,
                        value=None if raw.lower() == "none" else _number(raw, "/threshold"))
    if cmd == "method":
        if len(args) not in (1, 2) or args[-1] not in ("sft", "dpo", "sft+dpo"):
            raise ChatInputError("/method [OBJECTIVE] sft|dpo|sft+dpo")
        return ChatEdit(op="method", objective=args[0] if len(args) == 2 else None,
                        text=args[-1])
    if cmd in ("floor", "ceiling", "guard"):
        if len(args) != 2:
            raise ChatInputError(f"/{cmd} OBJECTIVE X")
        return ChatEdit(op=cmd, objective=args[0], value=_number(args[1], f"/{cmd}"))
    if cmd in ("maxchange", "max_change"):
        if len(args) != 1:
            raise ChatInputError("/maxchange X (largest per-round move of a mixture weight)")
        return ChatEdit(op="max_change", value=_number(args[0], "/maxchange"))
    if cmd in ("clearlimits", "clear_limits"):
        return ChatEdit(op="clear_limits")
    raise ChatInputError(f"unknown command /{cmd}; /help lists the commands")


# ---- applying edits ------------------------------------------------------------------------------


def apply_action_edit(action: dict[str, Any], edit: ChatEdit) -> dict[str, Any]:
    """A copy of `action` (DataAction JSON) with one edit applied. No validation here: the
    result goes through the check, which names every problem (unknown slice, a broken floor)."""
    out = copy.deepcopy(action)
    objectives = out.setdefault("objectives", {})
    oa = objectives.setdefault(edit.objective, {}) if edit.objective else None
    if edit.op == "mix":
        out["mixture"] = dict(edit.weights or {})
    elif edit.op == "buckets":
        oa["bucket_weights"] = dict(edit.weights or {})  # type: ignore[index]
    elif edit.op in ("focus", "exclude"):
        part = "include" if edit.op == "focus" else "exclude"
        focus = oa.setdefault("focus", {}) or {}  # type: ignore[union-attr]
        oa["focus"] = focus  # type: ignore[index]
        criteria = focus.setdefault(part, {}) or {}
        focus[part] = criteria
        criteria[edit.key] = list(edit.values or [])
        if edit.op == "focus" and not oa.get("focus_ratio"):  # type: ignore[union-attr]
            oa["focus_ratio"] = 0.5  # type: ignore[index]
    elif edit.op == "ratio":
        oa["focus_ratio"] = edit.value  # type: ignore[index]
    elif edit.op == "threshold":
        if oa is None:
            out["quality_threshold"] = edit.value
        else:
            oa["quality_threshold"] = edit.value
    elif edit.op == "method":
        if oa is None:
            out["method"] = edit.text
        else:
            oa["method"] = edit.text
    else:
        raise ValueError(f"{edit.op!r} does not edit the action")
    if not objectives:
        out.pop("objectives")
    return out


def apply_limit_edit(limits: dict[str, Any], edit: ChatEdit,
                     objectives: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Standing limits with one edit applied, and the problems that refuse it (then the limits
    come back unchanged)."""
    out = copy.deepcopy(limits)
    if edit.op == "clear_limits":
        return {}, []
    if edit.op in ("floor", "ceiling", "guard") and edit.objective not in objectives:
        return limits, [f"unknown objective {edit.objective!r}; objectives: {', '.join(objectives)}"]
    v = edit.value
    if edit.op in ("floor", "ceiling", "max_change") and (v is None or not 0 <= v <= 1):
        return limits, [f"/{edit.op} takes a mixture weight in [0, 1], got {v}"]
    if edit.op == "guard" and (v is None or not 1 <= v <= 5):
        return limits, [f"/guard takes a score in [1, 5], got {v}"]
    if edit.op == "max_change":
        if v == 0:
            return limits, ["/maxchange 0 would freeze the mixture; use a positive number"]
        out["max_change"] = v
    else:
        key = {"floor": "floors", "ceiling": "ceilings", "guard": "guards"}[edit.op]
        out.setdefault(key, {})[edit.objective] = v
    floors, ceilings = out.get("floors", {}), out.get("ceilings", {})
    problems = []
    if sum(floors.values()) > 1 + 1e-9:
        problems.append(f"floors sum to {sum(floors.values()):g}, more than 1: "
                        f"{json.dumps(floors, sort_keys=True)}")
    for name, f in floors.items():
        if name in ceilings and f > ceilings[name] + 1e-9:
            problems.append(f"the floor of {name!r} ({f:g}) is above its ceiling "
                            f"({ceilings[name]:g})")
    return (limits, problems) if problems else (out, [])


def parse_chat_edits(text: str) -> list[ChatEdit]:
    """The chat model's reply as typed edits (a ChatEdits JSON object); raises ChatInputError
    naming what is wrong, so the person sees it instead of an edit being guessed."""
    from mosaic.schemas import ChatEdits

    body = text.strip()
    if body.startswith("```"):
        body = body.strip("`").split("\n", 1)[-1]
    try:
        return ChatEdits.model_validate_json(body).edits
    except ValidationError as e:
        raise ChatInputError(f"the chat model's reply is not a valid list of edits: "
                             f"{e.errors()[0]['msg']} at {e.errors()[0]['loc']}") from None
