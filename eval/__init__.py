"""Objective types (plug-ins), judges, L3 -> L2 -> L1 aggregation and failure reports.

`eval/` knows nothing about training or planning. Importing it registers the built-in types.
"""

from mosaic.eval import ifeval, jailbreak, overrefusal  # noqa: F401  (registers the types)
from mosaic.eval.base import (FocusKey, ObjectiveType, get_objective_type, objective_type_names,
                              register_objective_type)

__all__ = ["FocusKey", "ObjectiveType", "get_objective_type", "objective_type_names",
           "register_objective_type"]
