"""Data files that ship inside the package (origin and licence of each in README.md here)."""

from __future__ import annotations

from pathlib import Path

RESOURCES_DIR = Path(__file__).resolve().parent
# Tulu-3 IF prompts in IFEval format (ODC-BY): the IFEval checker's coverage command and tests.
TULU3_IF_FILE = RESOURCES_DIR / "tulu3_if_constraints.jsonl"

# Real third-party text: the embedding judge's labelled rows and the smoke run's raw prompts.
REAL_TEXT_DIR = RESOURCES_DIR / "real_text"

__all__ = ["REAL_TEXT_DIR", "RESOURCES_DIR", "TULU3_IF_FILE"]
