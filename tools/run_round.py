"""One round of the loop as a plain function: check -> build -> train -> evaluate.

Every stage writes into the round folder and leaves a completion marker, so calling
`run_round` again on the same folder (after a crash, or from a resumed graph node) redoes only
the stages that did not finish:

    round_<k>/action.json        the proposal as received
    round_<k>/verdict.json       the check's verdict (written before anything is built)
    round_<k>/dataset/           train.parquet + manifest.json (marker)
    round_<k>/adapter/           PEFT adapter + train_result.json (published atomically)
    round_<k>/eval/, heldout/    responses, samples, reports (evaluate's own markers)
    round_<k>/round.json         RoundResult (marker of the whole round)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mosaic.config import MosaicConfig
from mosaic.io import atomic_write_json
from mosaic.schemas import DataAction, DatasetManifest, RoundResult, TrainResult

log = logging.getLogger(__name__)

ROUND_FILE = "round.json"


class RoundConflictError(ValueError):
    """The round folder already holds a different action: use a fresh folder."""


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def run_round(config: MosaicConfig, raw_action: str | bytes | dict[str, Any], round_dir: str | Path,
              *, round_index: int, previous_action: DataAction | None = None,
              seed: int | None = None, heldout: bool = True,
              progress: Callable[[str], None] | None = None) -> RoundResult:
    """Run (or finish) one round in `round_dir`; returns its `RoundResult`.

    An action the check rejects is not an error: the result has status "rejected" and the
    verdict's problems, and nothing is built or trained.
    """
    from mosaic.tools.build_dataset import (MANIFEST_FILE, check_and_build,
                                            prepare_from_config)
    from mosaic.tools.validate_action import ActionContext
    from mosaic.sandbox.base_model import ensure_base_model
    from mosaic.training.models import load_tokenizer

    say = progress or (lambda msg: log.info("%s", msg))
    round_dir = Path(round_dir)
    marker = round_dir / ROUND_FILE
    # The proposal exactly as received (it may be invalid JSON: that is data, not an error).
    received = {"raw": raw_action.decode("utf-8", "replace") if isinstance(raw_action, bytes)
                else raw_action if isinstance(raw_action, str) else json.dumps(raw_action)}
    action_file = round_dir / "action.json"
    if action_file.is_file() and _read_json(action_file) != received:
        raise RoundConflictError(f"{round_dir} already holds a different action ({action_file}); "
                                 f"use a fresh round folder")
    if marker.is_file():
        return RoundResult.model_validate(_read_json(marker))
    seed = config.seed + round_index if seed is None else seed
    atomic_write_json(action_file, received)

    base_model = ensure_base_model(config)
    tokenizer = load_tokenizer(base_model)
    say(f"round {round_index}: preparing pools")
    data = prepare_from_config(config, tokenizer)
    context = ActionContext.from_config(config, data.prepared, previous_action=previous_action,
                                        eval_ids=data.eval_ids)
    dataset_dir = round_dir / "dataset"
    if (dataset_dir / MANIFEST_FILE).is_file():
        # The dataset already exists: re-check (cheap) but do not rebuild.
        from mosaic.tools.validate_action import validate_action

        verdict = validate_action(raw_action, context)
        manifest = DatasetManifest.model_validate(_read_json(dataset_dir / MANIFEST_FILE))
    else:
        say(f"round {round_index}: checking the action and building the training set")
        outcome = check_and_build(raw_action, context, seed=seed, out_dir=dataset_dir)
        verdict, manifest = outcome.verdict, outcome.manifest
    atomic_write_json(round_dir / "verdict.json", verdict)
    if not verdict.ok or verdict.action is None or manifest is None:
        result = RoundResult(round=round_index, status="rejected", verdict=verdict)
        atomic_write_json(marker, result)
        return result
    action = verdict.action

    adapter_dir = round_dir / "adapter"
    if (adapter_dir / "train_result.json").is_file():
        train = TrainResult.model_validate(_read_json(adapter_dir / "train_result.json"))
    else:
        from mosaic.training.train import train_adapter

        say(f"round {round_index}: training a LoRA adapter ({action.method}, "
            f"{manifest.total_tokens} tokens, {manifest.total_rows} rows)")
        train = train_adapter(dataset_dir / "train.parquet", base_model=base_model,
                              adapter_dir=adapter_dir, training=config.training,
                              max_length=config.model.max_length, method=action.method,
                              dtype=config.model.dtype)

    say(f"round {round_index}: evaluating")
    scores, heldout_scores = _evaluate_splits(config, base_model, adapter_dir, round_dir,
                                              round_index, heldout, say)
    result = RoundResult(round=round_index, status="done", verdict=verdict, action=action,
                         manifest=manifest, train=train, scores=scores,
                         heldout_scores=heldout_scores)
    atomic_write_json(marker, result)
    return result


def run_baseline(config: MosaicConfig, round_dir: str | Path, *, heldout: bool = True,
                 progress: Callable[[str], None] | None = None) -> RoundResult:
    """Round 0: the base model without an adapter, evaluated into `round_dir`."""
    from mosaic.sandbox.base_model import ensure_base_model

    round_dir = Path(round_dir)
    marker = round_dir / ROUND_FILE
    if marker.is_file():
        return RoundResult.model_validate(_read_json(marker))
    scores, heldout_scores = _evaluate_splits(config, ensure_base_model(config), None,
                                              round_dir, 0, heldout, progress)
    result = RoundResult(round=0, status="baseline", scores=scores,
                         heldout_scores=heldout_scores)
    atomic_write_json(marker, result)
    return result


def _evaluate_splits(config: MosaicConfig, base_model: Path, adapter_dir: Path | None,
                     round_dir: Path, round_index: int, heldout: bool,
                     say: Callable[[str], None] | None):
    """Scores on the eval sets and, when asked and every objective has one, the held-out sets."""
    from mosaic.tools.evaluate import evaluate

    scores = evaluate(config, base_model, adapter_dir, round_dir, "eval", round=round_index,
                      progress=say).scores()
    if not (heldout and all(o.heldout for o in config.objectives.values())):
        return scores, None
    return scores, evaluate(config, base_model, adapter_dir, round_dir, "heldout",
                            round=round_index, progress=say).scores()


__all__ = ["ROUND_FILE", "RoundConflictError", "run_baseline", "run_round"]
