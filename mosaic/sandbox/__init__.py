"""The sandbox world (DESIGN.md): a seeded, self-contained world of pools, eval, held-out and
judge sets, a vulnerable base corpus, a local tokenizer (`world`), and the tiny base model
trained on it (`base_model`). Wording lives in prompts/sandbox/*.j2 (`text`); each objective's
generator is a module of its own (`safety`, `boundary`, `instruction`, `corpus`)."""

from mosaic.sandbox.world import World, WorldError, ensure_world

__all__ = ["World", "WorldError", "ensure_world"]
