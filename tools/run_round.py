"""One round of the loop as plain functions: check + build -> train -> evaluate.

Each stage writes into the round folder and leaves a completion marker keyed by its inputs
(`mosaic.markers`), so calling a stage again (after a crash, from a resumed graph node, or by
`mosaic round` on the same folder) reuses its output only when nothing that determines it has
changed, and otherwise recomputes it and says why:

    round_<k>/action.json         the proposal as received (a folder holds one action)
    round_<k>/verdict.json        the check's verdict (written before anything is built)
    round_<k>/dataset/            train.parquet + manifest.json
    round_<k>/dataset.done.json   marker: action, pools, eval sets, tokenizer, budget, seed, limits
    round_<k>/adapter/            PEFT adapter + train_result.json (published atomically)
    round_<k>/adapter.done.json   marker: dataset, base model, training settings
    round_<k>/eval/, heldout/     responses, samples, reports (evaluate's own markers)
    round_<k>/round.json          RoundResult: the round's summary, rewritten by every run

The graph's nodes call `dataset_stage`, `train_stage` and `evaluate_stage` one by one;
`run_round` is the same three in a row.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mosaic.config import MosaicConfig
from mosaic.io import atomic_write_json, read_record
from mosaic.markers import check_marker, dir_fingerprint, file_sha256, write_marker
from mosaic.schemas import ActionVerdict, DataAction, DatasetManifest, RoundResult, TrainResult

log = logging.getLogger(__name__)

ROUND_FILE = "round.json"
DATASET_MARKER = "dataset.done.json"
ADAPTER_MARKER = "adapter.done.json"
# Bump when what a given (pools, action, seed) selects changes, so old datasets are rebuilt.
DATASET_FORMAT = 1

Say = Callable[[str], None]


class RoundConflictError(ValueError):
    """The round folder already holds a different action: use a fresh folder."""


def _say(progress: Say | None) -> Say:
    return progress or (lambda msg: log.info("%s", msg))


def round_seed(config: MosaicConfig, round_index: int) -> int:
    """The build seed of a round: the run's seed plus the round number."""
    return config.seed + round_index


# ---- what determines a round's dataset ---------------------------------------------------------


def data_inputs(config: MosaicConfig) -> dict[str, Any]:
    """Fingerprints of everything the check and the builder read besides the action: pools,
    eval / held-out sets (the overlap guard), the tokenizer (token counts), objective types,
    max_length (windowing)."""
    from mosaic.sandbox.base_model import tokenizer_dir

    return {
        "objectives": {n: o.type for n, o in config.objectives.items()},
        "pools": {n: file_sha256(o.pool) if o.pool and Path(o.pool).is_file() else None
                  for n, o in config.objectives.items()},
        "eval_sets": {f"{n}.{split}": file_sha256(path)
                      for n, o in config.objectives.items()
                      for split, path in (("eval", o.eval), ("heldout", o.heldout))
                      if path and Path(path).is_file()},
        "tokenizer": dir_fingerprint(tokenizer_dir(config)),
        "max_length": config.model.max_length,
    }


_RUN_DATA: dict[str, Any] = {}


def run_data(config: MosaicConfig, inputs: dict[str, Any] | None = None):
    """The run's prepared pools and eval hashes (`prepare_from_config`), kept per process:
    every round of a run reads the same pools, and preparing them costs seconds."""
    from mosaic.markers import hash_obj
    from mosaic.sandbox.base_model import tokenizer_dir
    from mosaic.tools.dataset.pools import prepare_from_config
    from mosaic.training.models import load_tokenizer

    key = hash_obj(inputs if inputs is not None else data_inputs(config))
    if key not in _RUN_DATA:
        _RUN_DATA.clear()  # one run's pools at a time: they can be large
        _RUN_DATA[key] = prepare_from_config(config, load_tokenizer(tokenizer_dir(config)))
    return _RUN_DATA[key]


def _received(raw_action: str | bytes | dict[str, Any]) -> dict[str, str]:
    # The proposal exactly as received (it may be invalid JSON: that is data, not an error).
    return {"raw": raw_action.decode("utf-8", "replace") if isinstance(raw_action, bytes)
            else raw_action if isinstance(raw_action, str) else json.dumps(raw_action)}


def _hold_action(round_dir: Path, raw_action: str | bytes | dict[str, Any]) -> None:
    action_file = round_dir / "action.json"
    received = _received(raw_action)
    if action_file.is_file():
        if json.loads(action_file.read_text(encoding="utf-8")) != received:
            raise RoundConflictError(f"{round_dir} already holds a different action "
                                     f"({action_file}); use a fresh round folder")
        return
    atomic_write_json(action_file, received)


def _base_model(config: MosaicConfig) -> Path:
    from mosaic.sandbox.base_model import ensure_base_model

    return Path(ensure_base_model(config))


# ---- stages --------------------------------------------------------------------------------------


def dataset_stage(config: MosaicConfig, raw_action: str | bytes | dict[str, Any],
                  round_dir: str | Path, *, round_index: int,
                  previous_action: DataAction | None = None, seed: int | None = None,
                  progress: Say | None = None) -> tuple[ActionVerdict, DatasetManifest | None]:
    """Check the action and, if it passes, build its training set into `round_dir/dataset`.

    An action the check rejects is not an error: the verdict says why and nothing is built.
    """
    from mosaic.tools.build_dataset import MANIFEST_FILE, TRAIN_FILE, check_and_build
    from mosaic.tools.validate_action import ActionContext

    say = _say(progress)
    round_dir = Path(round_dir)
    _hold_action(round_dir, raw_action)
    seed = round_seed(config, round_index) if seed is None else seed
    data = data_inputs(config)
    inputs = {
        "format": DATASET_FORMAT, "action": _received(raw_action), "data": data,
        "budget": config.budget.max_tokens, "seed": seed,
        "limits": config.limits.model_dump(mode="json"),
        # The previous action only matters to the per-round change limit.
        "previous_action": (previous_action.model_dump(mode="json")
                            if previous_action is not None and config.limits.max_change is not None
                            else None),
    }
    verdict_file, dataset_dir = round_dir / "verdict.json", round_dir / "dataset"
    marker = round_dir / DATASET_MARKER
    check = check_marker(marker, inputs, [verdict_file])
    if check.ok:
        verdict = read_record(verdict_file, ActionVerdict)
        manifest = read_record(dataset_dir / MANIFEST_FILE, DatasetManifest) if verdict.ok else None
        return verdict, manifest
    if marker.exists():
        say(f"round {round_index}: rebuilding the dataset ({check.describe()})")
    else:
        say(f"round {round_index}: checking the action and building the training set")
    marker.unlink(missing_ok=True)
    shutil.rmtree(dataset_dir, ignore_errors=True)
    prepared = run_data(config, data)
    context = ActionContext.from_config(config, prepared.prepared, previous_action=previous_action,
                                        eval_ids=prepared.eval_ids)
    outcome = check_and_build(raw_action, context, seed=seed, out_dir=dataset_dir)
    atomic_write_json(verdict_file, outcome.verdict)
    outputs = [verdict_file]
    if outcome.manifest is not None:
        outputs += [dataset_dir / TRAIN_FILE, dataset_dir / MANIFEST_FILE]
    write_marker(marker, inputs, outputs, status=outcome.verdict.status)
    return outcome.verdict, outcome.manifest


# Training settings added after runs were recorded, with the value every earlier run trained
# with: at that value they are left out of the adapter marker, so those runs' adapters still
# count as done.
_LATER_TRAINING_DEFAULTS = {"dpo_learning_rate": None, "dpo_loss": "sigmoid",
                            "dpo_sft_weight": 0.0, "dpo_length_alpha": None,
                            "dpo_packed": True}


def training_inputs(config: MosaicConfig, method: str = "dpo") -> dict[str, Any]:
    """The training settings that determine an adapter, as its marker records them (the later
    DPO settings only when the round's `method` trains by DPO: an SFT adapter ignores them)."""
    out = config.training.model_dump(mode="json")
    for key, default in _LATER_TRAINING_DEFAULTS.items():
        if method == "sft" or out.get(key) == default:
            out.pop(key, None)
    return out


def train_stage(config: MosaicConfig, round_dir: str | Path, manifest: DatasetManifest, *,
                round_index: int, progress: Say | None = None, bars: bool = True,
                base_model: str | Path | None = None) -> TrainResult:
    """LoRA-train a fresh adapter from the base model on the round's dataset (`bars`: the
    trainer's own progress bars; off under a display that shows progress itself). `base_model`:
    the directory the run resolved when it opened (else it is resolved here)."""
    from mosaic.tools.build_dataset import TRAIN_FILE

    say = _say(progress)
    round_dir = Path(round_dir)
    base_model = Path(base_model) if base_model is not None else _base_model(config)
    adapter_dir = round_dir / "adapter"
    inputs = {"dataset": manifest.output_hash, "base_model": dir_fingerprint(base_model),
              "training": training_inputs(config, manifest.method), "method": manifest.method,
              "max_length": config.model.max_length, "dtype": config.model.dtype}
    outputs = [adapter_dir / n for n in ("adapter_config.json", "adapter_model.safetensors",
                                         "train_result.json")]
    marker = round_dir / ADAPTER_MARKER
    check = check_marker(marker, inputs, outputs)
    if check.ok:
        return read_record(adapter_dir / "train_result.json", TrainResult)
    from mosaic import stage_cache
    from mosaic.training.train import train_adapter

    marker.unlink(missing_ok=True)
    files = [p.name for p in outputs]
    cache = config.cache.stages_dir
    if stage_cache.restore(cache, "adapter", inputs, adapter_dir, files):
        say(f"round {round_index}: reusing an adapter trained before on the same dataset, base "
            f"model and settings (stage cache {cache})")
        train = read_record(adapter_dir / "train_result.json", TrainResult)
        write_marker(marker, inputs, outputs)
        return train
    if config.inference.backend == "vllm":
        from mosaic.training.vllm_backend import release_engines

        release_engines()  # the trainer needs the GPU memory the engine holds
    why = f" (retraining: {check.describe()})" if check.reasons != ["not done yet"] else ""
    say(f"round {round_index}: training a LoRA adapter ({manifest.method}, "
        f"{manifest.total_tokens:,} tokens, {manifest.total_rows:,} rows){why}")
    train = train_adapter(round_dir / "dataset" / TRAIN_FILE, base_model=base_model,
                          adapter_dir=adapter_dir, training=config.training,
                          max_length=config.model.max_length, method=manifest.method,
                          dtype=config.model.dtype, threads=config.runtime.threads,
                          progress=bars)
    stage_cache.store(cache, "adapter", inputs, adapter_dir)  # the whole folder
    write_marker(marker, inputs, outputs)
    return train


def evaluate_stage(config: MosaicConfig, round_dir: str | Path, *, round_index: int,
                   adapter_dir: str | Path | None, heldout: bool = True,
                   progress: Say | None = None, base_model: str | Path | None = None
                   ) -> tuple[dict[str, float | None], dict[str, float | None] | None]:
    """Scores on the eval sets and, when asked and every objective has one, the held-out sets
    (evaluate's markers skip what is already generated and judged). `base_model`: the directory
    the run resolved when it opened (else it is resolved here)."""
    from mosaic.tools.evaluate import evaluate

    if config.inference.backend == "openai":
        base_model = None  # the endpoint answers with its own model
    elif base_model is None:
        base_model = _base_model(config)
    adapter = Path(adapter_dir) if adapter_dir is not None else None
    base_model = Path(base_model) if base_model is not None else None
    scores = evaluate(config, base_model, adapter, round_dir, "eval", round=round_index,
                      progress=progress).scores()
    if not (heldout and all(o.heldout for o in config.objectives.values())):
        return scores, None
    return scores, evaluate(config, base_model, adapter, round_dir, "heldout",
                            round=round_index, progress=progress).scores()


# ---- a whole round ---------------------------------------------------------------------------------


def run_round(config: MosaicConfig, raw_action: str | bytes | dict[str, Any], round_dir: str | Path,
              *, round_index: int, previous_action: DataAction | None = None,
              seed: int | None = None, heldout: bool = True,
              progress: Say | None = None) -> RoundResult:
    """Run (or finish) one round in `round_dir`; returns its `RoundResult`.

    An action the check rejects is not an error: the result has status "rejected" and the
    verdict's problems, and nothing is built or trained.
    """
    round_dir = Path(round_dir)
    verdict, manifest = dataset_stage(config, raw_action, round_dir, round_index=round_index,
                                      previous_action=previous_action, seed=seed,
                                      progress=progress)
    if not verdict.ok or verdict.action is None or manifest is None:
        result = RoundResult(round=round_index, status="rejected", verdict=verdict)
        atomic_write_json(round_dir / ROUND_FILE, result)
        return result
    train = train_stage(config, round_dir, manifest, round_index=round_index, progress=progress)
    _say(progress)(f"round {round_index}: evaluating")
    scores, heldout_scores = evaluate_stage(config, round_dir, round_index=round_index,
                                            adapter_dir=round_dir / "adapter", heldout=heldout,
                                            progress=progress)
    result = RoundResult(round=round_index, status="done", verdict=verdict, action=verdict.action,
                         manifest=manifest, train=train, scores=scores,
                         heldout_scores=heldout_scores)
    atomic_write_json(round_dir / ROUND_FILE, result)
    return result


def run_baseline(config: MosaicConfig, round_dir: str | Path, *, heldout: bool = True,
                 progress: Say | None = None,
                 base_model: str | Path | None = None) -> RoundResult:
    """Round 0: the base model without an adapter, evaluated into `round_dir`."""
    scores, heldout_scores = evaluate_stage(config, round_dir, round_index=0, adapter_dir=None,
                                            heldout=heldout, progress=progress,
                                            base_model=base_model)
    result = RoundResult(round=0, status="baseline", scores=scores, heldout_scores=heldout_scores)
    atomic_write_json(Path(round_dir) / ROUND_FILE, result)
    return result


__all__ = ["ROUND_FILE", "RoundConflictError", "dataset_stage", "evaluate_stage", "run_baseline",
           "run_data", "run_round", "train_stage"]
