"""Data files that ship inside the package (origin and licence of each in README.md here)."""

from __future__ import annotations

from pathlib import Path

RESOURCES_DIR = Path(__file__).resolve().parent
# Tulu-3 IF prompts in IFEval format (ODC-BY): the IFEval checker's coverage command and tests.
TULU3_IF_FILE = RESOURCES_DIR / "tulu3_if_constraints.jsonl"

__all__ = ["RESOURCES_DIR", "TULU3_IF_FILE"]
