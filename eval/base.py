"""The one interface every objective type implements, and the registry of types.

An objective type owns its L3 schema, the deterministic L3 -> L2 -> L1 formulas, the focus keys
a data action may use on its pools, its type-specific failure-report breakdowns, and what a
planner needs to know about it (`planner_focus`: which prompt-side focus criteria pick the
situations its latest report says fail; `quality_exclude`: which answers to keep out while a
quality threshold is held; `slice_level`: the order of its slices). Nothing outside `eval/`
branches on a type name, so a fourth type is one new module plus a `register_objective_type`
call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd

from mosaic.schemas import L1, FailureReport

FocusKind = Literal["set", "range"]


@dataclass(frozen=True)
class FocusKey:
    """A focus criterion a data action may name for this type.

    `kind="set"`: the action gives a list of allowed values; a row matches if its column value
    (or, for list columns, any element of it) is in the list. `kind="range"`: the action gives
    `[lo, hi]` (inclusive) over a numeric column.
    """

    column: str
    kind: FocusKind
    values: tuple[Any, ...] | None = None  # allowed values for "set" keys, when finite
    bounds: tuple[float, float] | None = None  # valid range for "range" keys
    is_list: bool = False  # the column holds a list per row (e.g. leak types)


class ObjectiveType(ABC):
    """Plug-in interface. Subclasses are stateless; instances are cheap."""

    type_name: ClassVar[str]
    prompt_atoms: ClassVar[tuple[str, ...]]
    response_atoms: ClassVar[tuple[str, ...]]
    slices: ClassVar[tuple[str, ...]]
    focus_keys: ClassVar[dict[str, FocusKey]]
    # L2 fields stored as flat pool columns named `l2_<field>` so focus masks stay vectorised.
    l2_columns: ClassVar[tuple[str, ...]]
    # Prompt atoms that only the dataset can supply (e.g. IFEval constraint ids and kwargs):
    # no judge is asked for them.
    prompt_atoms_from_data: ClassVar[bool] = False

    @abstractmethod
    def l2(self, prompt: Mapping[str, Any], response: Mapping[str, Any]) -> dict[str, Any]:
        """Deterministic aggregates from the prompt-channel and response-channel L3 atoms."""

    @abstractmethod
    def l1(self, l2: Mapping[str, Any]) -> L1:
        """Slice, 1-5 score, validity, weight and failure flag from L2."""

    def score(self, prompt: Mapping[str, Any], response: Mapping[str, Any]) -> tuple[dict[str, Any], L1]:
        l2 = self.l2(prompt, response)
        return l2, self.l1(l2)

    def code_response_atoms(self, conversations: Sequence[Sequence[Mapping[str, str]]],
                            prompt_atoms: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]] | None:
        """Response atoms computed by code for types whose criteria are verifiable (every judge
        uses them), or None when a judge must label the responses."""
        return None

    def breakdowns(self, l2_rows: Sequence[Mapping[str, Any]], l1_rows: Sequence[L1]) -> dict[str, Any]:
        """Type-specific failure-report breakdowns (override per type)."""
        return {}

    # ---- what a planner asks the type (STYLE.md 15: planners name no type) -------------------

    def slice_level(self, slice_name: str) -> int:
        """The ordinal of a slice (`complexity_3` -> 3): every built-in slice name ends in
        `_<level>`; a type whose slices do not overrides this."""
        return int(slice_name.rsplit("_", 1)[1])

    def planner_focus(self, report: FailureReport, top: int) -> dict[str, Any]:
        """Prompt-side `include` criteria that pick the situations the report says fail, at most
        `top` values per key; {} for none. Only prompt-side keys: response-side ones select
        answers that failed, data to keep out, never to imitate. Default: nothing."""
        return {}

    def quality_exclude(self) -> dict[str, Any]:
        """`exclude` criteria that keep low-quality answers out while a quality threshold is
        held (a planner drops them together with the threshold). Default: none."""
        return {}

    def failing_levels(self, report: FailureReport) -> list[int]:
        """Levels of the report's failing slices, worst fail rate first (ties by name)."""
        failing = sorted((s for s in report.slices if s.fail_rate and s.fail_rate > 0),
                         key=lambda s: (-(s.fail_rate or 0.0), s.slice))
        return [self.slice_level(s.slice) for s in failing]

    # ---- focus criteria over pool columns (vectorised) ---------------------------------------

    def focus_mask(self, pool: pd.DataFrame, key: str, value: Any) -> np.ndarray:
        """Boolean mask of pool rows matching one focus criterion `key: value`."""
        spec = self.focus_keys[key]
        col = pool[spec.column]
        if spec.kind == "range":
            lo, hi = value
            arr = col.to_numpy(dtype=float)
            return (arr >= lo) & (arr <= hi)
        wanted = set(value)
        if spec.is_list:
            # Explode once, test membership, fold back to rows by position: folding by the
            # frame's own index would merge rows that share a label (e.g. concatenated pools).
            exploded = col.reset_index(drop=True).explode()
            hit = exploded.isin(wanted)
            return (hit.groupby(level=0).any()
                    .reindex(range(len(pool)), fill_value=False).to_numpy(dtype=bool))
        return col.isin(wanted).to_numpy()

    def criteria_mask(self, pool: pd.DataFrame, criteria: Mapping[str, Any]) -> np.ndarray:
        """Rows matching ANY of the criteria (DESIGN.md: include/exclude are disjunctions)."""
        mask = np.zeros(len(pool), dtype=bool)
        for key, value in criteria.items():
            mask |= self.focus_mask(pool, key, value)
        return mask

    def l2_to_columns(self, l2: Mapping[str, Any]) -> dict[str, Any]:
        return {f"l2_{k}": l2[k] for k in self.l2_columns}


_REGISTRY: dict[str, type[ObjectiveType]] = {}


def register_objective_type(cls: type[ObjectiveType]) -> type[ObjectiveType]:
    if cls.type_name in _REGISTRY and _REGISTRY[cls.type_name] is not cls:
        raise ValueError(f"objective type {cls.type_name!r} is already registered")
    _REGISTRY[cls.type_name] = cls
    return cls


# The built-in types register themselves when `mosaic.eval` is imported, which Python always
# does before it imports this module, so the registry is never seen without them.


def get_objective_type(type_name: str) -> ObjectiveType:
    try:
        return _REGISTRY[type_name]()
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(f"unknown objective type {type_name!r}; known types: {known}") from None


def objective_type_names() -> list[str]:
    return sorted(_REGISTRY)
