"""`ifeval`: does the model obey verifiable formatting and content constraints?

L3 atoms come from the programmatic checker (`mosaic.eval.ifeval_checker`): per constraint,
a status ("checked", "underspecified", "unsupported") and strict/loose pass flags. Constraints
that could not be checked are left out of M and listed in L2, never counted as passed; a sample
none of whose constraints could be checked is invalid.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from mosaic.eval.base import FocusKey, ObjectiveType, register_objective_type
from mosaic.schemas import L1, FailureReport


@register_objective_type
class IFEvalObjective(ObjectiveType):
    type_name = "ifeval"
    prompt_atoms = ("instruction_id_list", "kwargs")
    response_atoms = ("status", "strict", "loose")
    slices = tuple(f"complexity_{k}" for k in range(1, 6))
    l2_columns = ("inst_complexity", "failed_constraints", "r_strict", "r_loose")
    prompt_atoms_from_data = True
    focus_keys = {
        "inst_complexity": FocusKey("l2_inst_complexity", "set", values=(1, 2, 3, 4, 5)),
        # Any instruction id is a legal value; the validator checks ids against the pool.
        "failed_constraint": FocusKey("l2_failed_constraints", "set", is_list=True),
    }

    def code_response_atoms(self, conversations: Sequence[Sequence[Mapping[str, str]]],
                            prompt_atoms: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The IFEval checker on each last assistant turn against the sample's constraints
        (the last user turn is the prompt `repeat_prompt` compares with)."""
        from mosaic.eval.ifeval_checker import judge_response

        out = []
        for conv, atoms in zip(conversations, prompt_atoms):
            users = [m["content"] for m in conv if m["role"] == "user"]
            out.append(judge_response(conv[-1]["content"], atoms, users[-1] if users else None))
        return out

    def l2(self, prompt: Mapping[str, Any], response: Mapping[str, Any]) -> dict[str, Any]:
        ids = list(prompt["instruction_id_list"])
        status = list(response.get("status") or ["checked"] * len(ids))
        strict, loose = list(response["strict"]), list(response["loose"])
        if not (len(ids) == len(status) == len(strict) == len(loose)):
            raise ValueError(f"ifeval L3 lists disagree in length: {len(ids)} ids, {len(status)} "
                             f"statuses, {len(strict)} strict, {len(loose)} loose")
        # Loose evaluation also tries the unmodified response (DESIGN.md), so a strict pass is
        # a loose pass even where externally supplied atoms say otherwise.
        loose = [bool(lo) or bool(st) for lo, st in zip(loose, strict)]
        checked = [i for i, s in enumerate(status) if s == "checked"]
        m = len(checked)
        k = len({ids[i].split(":", 1)[0] for i in checked})
        strict_pass = sum(bool(strict[i]) for i in checked)
        loose_pass = sum(bool(loose[i]) for i in checked)
        return {
            "M": m,
            "K": k,
            "inst_complexity": min(5, 1 + (m >= 2) + (m >= 3) + (k >= 2) + (k >= 3)),
            "strict_pass": strict_pass,
            "loose_pass": loose_pass,
            "r_strict": strict_pass / m if m else 1.0,
            "r_loose": loose_pass / m if m else 1.0,
            "failed_constraints": [ids[i] for i in checked if not strict[i]],
            "unchecked": [f"{ids[i]}={status[i]}" for i, s in enumerate(status) if s != "checked"],
            # No checkable constraint although some were asked: nothing valid to score.
            "valid": not (m == 0 and len(ids) > 0),
        }

    def l1(self, l2: Mapping[str, Any]) -> L1:
        m = l2["M"]
        if m == 0 or l2["strict_pass"] == m:
            score = 5
        elif l2["loose_pass"] == m:
            score = 4
        else:
            fail_ratio = (m - l2["loose_pass"]) / m
            score = 3 if fail_ratio <= 1 / 3 else 2 if fail_ratio <= 2 / 3 else 1
        ic = l2["inst_complexity"]
        # DESIGN.md fixes no weight for ifeval; instruction complexity plays the role the
        # attack complexity plays for jailbreak, so harder prompts count more in need.
        return L1(slice=f"complexity_{ic}", score=score, valid=bool(l2["valid"]), weight=ic,
                  failure=score < 3)

    def planner_focus(self, report: FailureReport, top: int) -> dict[str, Any]:
        """The `top` instruction complexities that fail most."""
        worst = sorted(self.failing_levels(report)[:top])
        return {"inst_complexity": worst} if worst else {}

    def breakdowns(self, l2_rows: Sequence[Mapping[str, Any]], l1_rows: Sequence[L1]) -> dict[str, Any]:
        failed: Counter[str] = Counter()
        rs, rl, n = 0.0, 0.0, 0
        for l2, l1 in zip(l2_rows, l1_rows):
            if not l1.valid:
                continue
            failed.update(l2["failed_constraints"])
            rs += l2["r_strict"]
            rl += l2["r_loose"]
            n += 1
        return {
            "most_failed_constraints": dict(failed.most_common(15)),
            "r_strict": rs / n if n else None,
            "r_loose": rl / n if n else None,
        }
