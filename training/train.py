"""LoRA SFT and DPO rounds with trl: validate the file, train from fresh base weights, save the adapter.

Methods: `sft`, `dpo` (reference log-probs computed once, before the first step, with the adapter
disabled) and `sft+dpo` (SFT on the pairs' chosen answers, then DPO on the same pairs from there,
the reference being the SFT'd adapter, frozen as trl's "ref" copy). DPO forwards each pair as one
packed sequence, its prompt once (`packed_pairs`), where the model allows it.

Rows trl would choke on deep inside its pipeline (no assistant turn, empty conversations,
samples longer than the model's max length, which trl would silently truncate) are skipped
here with counts per reason; a structurally malformed file is an error naming file, row and field.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mosaic.io import atomic_write_json, publish_dir
from mosaic.schemas import TrainResult

log = logging.getLogger("mosaic.training")

Rows = Sequence[dict[str, Any]]
Method = Literal["sft", "dpo", "sft+dpo", "mixed"]
# `mixed`: a round whose objectives train differently; each row's `method` column says how.
METHODS = ("sft", "dpo", "sft+dpo", "mixed")


class TrainingDataError(ValueError):
    """A training file is malformed (the message names the file, row and field) or has no
    usable rows left after skipping."""


# --------------------------------------------------------------------------------------------
# Reading and validating training files
# --------------------------------------------------------------------------------------------


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a Parquet or JSONL training file (`mosaic.data.read_rows`), errors as
    TrainingDataError naming file, row (line) and field."""
    from mosaic.data import DataFormatError
    from mosaic.data import read_rows as read_data_rows

    try:
        return read_data_rows(path)
    except FileNotFoundError:
        raise TrainingDataError(f"training file not found: {path}") from None
    except DataFormatError as e:
        raise TrainingDataError(str(e)) from None


def check_messages(value: Any, where: str) -> list[dict[str, str]]:
    """A conversation as a clean list of {role, content}; None/[] give []. Raises on bad shape
    (`mosaic.data.message_problem` is the one definition of a well-formed conversation)."""
    from mosaic.data import message_problem

    if value is None:
        return []
    if isinstance(value, tuple):
        value = list(value)
    problem = message_problem(value)
    if problem:
        raise TrainingDataError(f"{where}: {problem}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


@dataclass
class PreparedData:
    """Rows trl can train on, with what was dropped and why."""

    rows: list[dict[str, Any]]
    tokens: int
    lengths: list[int]
    skipped: dict[str, int] = field(default_factory=dict)


def _require_column(rows: Rows, column: str, source: str) -> None:
    for i, row in enumerate(rows):
        if column not in row:
            raise TrainingDataError(f"{source} row {i}: missing column {column!r} "
                                    f"(columns: {sorted(row)})")


def _token_lengths(tokenizer: Any, conversations: list[list[dict[str, str]]],
                   **kwargs: Any) -> list[int]:
    if not conversations:
        return []
    enc = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True, **kwargs)
    return [len(ids) for ids in enc["input_ids"]]


def prepare_sft_rows(rows: Rows, tokenizer: Any, max_length: int,
                     source: str = "<rows>") -> PreparedData:
    """Keep rows with a non-empty conversation that has an assistant turn and fits max_length."""
    _require_column(rows, "messages", source)
    skipped: Counter[str] = Counter()
    candidates = []
    for i, row in enumerate(rows):
        msgs = check_messages(row["messages"], f"{source} row {i} field 'messages'")
        if not msgs:
            skipped["empty_messages"] += 1
        elif not any(m["role"] == "assistant" for m in msgs):
            skipped["no_assistant_turn"] += 1
        else:
            candidates.append(msgs)
    kept, lengths = [], []
    if candidates:
        enc = tokenizer.apply_chat_template(candidates, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        for msgs, ids, mask in zip(candidates, enc["input_ids"], enc["assistant_masks"]):
            if not any(mask):
                # The structure has an assistant turn, so the template is what failed.
                raise TrainingDataError(
                    "the tokenizer's chat template marks no assistant tokens; it must wrap "
                    "assistant turns in {% generation %}...{% endgeneration %} for "
                    "assistant-only loss")
            if len(ids) > max_length:
                skipped["too_long"] += 1
                continue
            kept.append({"messages": msgs})
            lengths.append(len(ids))
    return PreparedData(kept, sum(lengths), lengths, dict(skipped))


def prepare_dpo_rows(rows: Rows, tokenizer: Any, max_length: int,
                     source: str = "<rows>") -> PreparedData:
    """Keep preference rows (conversational `prompt`, `chosen`, `rejected`) whose prompt ends
    with a user turn, whose answers are assistant turns, and whose longer side fits max_length."""
    for col in ("prompt", "chosen", "rejected"):
        _require_column(rows, col, source)
    skipped: Counter[str] = Counter()
    candidates = []
    for i, row in enumerate(rows):
        where = f"{source} row {i} field"
        prompt = check_messages(row["prompt"], f"{where} 'prompt'")
        chosen = check_messages(row["chosen"], f"{where} 'chosen'")
        rejected = check_messages(row["rejected"], f"{where} 'rejected'")
        if not prompt:
            skipped["empty_prompt"] += 1
        elif prompt[-1]["role"] != "user":
            skipped["prompt_not_ending_with_user"] += 1
        elif not chosen or not rejected:
            skipped["empty_chosen_or_rejected"] += 1
        elif any(m["role"] != "assistant" for m in chosen + rejected):
            skipped["non_assistant_answer"] += 1
        elif chosen == rejected:
            skipped["chosen_equals_rejected"] += 1
        else:
            candidates.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    len_c = _token_lengths(tokenizer, [r["prompt"] + r["chosen"] for r in candidates])
    len_r = _token_lengths(tokenizer, [r["prompt"] + r["rejected"] for r in candidates])
    len_p = _token_lengths(tokenizer, [r["prompt"] for r in candidates],
                           add_generation_prompt=True)
    kept, lengths = [], []
    for row, lc, lr, lp in zip(candidates, len_c, len_r, len_p):
        if max(lc, lr) > max_length:
            skipped["too_long"] += 1
            continue
        kept.append(row)
        # Counted as the dataset builder budgets a pair: the prompt once, both answers.
        lengths.append(lc + lr - lp)
    return PreparedData(kept, sum(lengths), lengths, dict(skipped))


def prepare_mixed_rows(rows: Rows, tokenizer: Any, max_length: int,
                       source: str = "<rows>") -> PreparedData:
    """A `mixed` set: `sft` rows (messages) and `dpo` / `sft+dpo` pairs, told apart by each
    row's `method`; pair rows keep their method so the SFT stage can take the chosen answers."""
    _require_column(rows, "method", source)
    bad = sorted({str(r["method"]) for r in rows} - {"sft", "dpo", "sft+dpo"})
    if bad:
        raise TrainingDataError(f"{source}: unknown method(s) {bad} in column 'method'; "
                                f"expected sft, dpo or sft+dpo")
    kept, lengths = [], []
    skipped: Counter[str] = Counter()
    for method in ("sft", "dpo", "sft+dpo"):
        part = [r for r in rows if r["method"] == method]
        if not part:
            continue
        prepare = prepare_sft_rows if method == "sft" else prepare_dpo_rows
        got = prepare(part, tokenizer, max_length, f"{source} ({method} rows)")
        kept += [{**r, "method": method} for r in got.rows]
        lengths += got.lengths
        skipped.update(got.skipped)
    return PreparedData(kept, sum(lengths), lengths, dict(skipped))


def stage_data(prepared: PreparedData, method: Method
               ) -> tuple[PreparedData | None, PreparedData | None]:
    """(SFT stage, DPO stage) of a method's data: `sft+dpo` (and a mixed set's `sft+dpo` pairs)
    warm up on the chosen answers before the DPO stage trains on the pairs."""
    if method == "sft":
        return prepared, None
    if method == "dpo":
        return None, prepared
    if method == "sft+dpo":
        return sft_rows_of_pairs(prepared), prepared
    sft = [{"messages": r["messages"]} for r in prepared.rows if r["method"] == "sft"]
    warm = [{"messages": r["prompt"] + r["chosen"]} for r in prepared.rows
            if r["method"] == "sft+dpo"]
    pairs = [({k: r[k] for k in ("prompt", "chosen", "rejected")}, n)
             for r, n in zip(prepared.rows, prepared.lengths) if r["method"] != "sft"]
    return (PreparedData(sft + warm, 0, []) if sft or warm else None,
            PreparedData([r for r, _ in pairs], sum(n for _, n in pairs),
                         [n for _, n in pairs]) if pairs else None)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def load_prepared(data: str | Path | Rows, tokenizer: Any, max_length: int,
                  method: Method) -> PreparedData:
    """Read (if a path) and validate training data; skips are logged, nothing left is an error."""
    source = str(data) if isinstance(data, (str, Path)) else "<rows>"
    rows = read_rows(data) if isinstance(data, (str, Path)) else list(data)
    if method == "mixed":
        prepared = prepare_mixed_rows(rows, tokenizer, max_length, source)
    else:
        prepare = prepare_sft_rows if method == "sft" else prepare_dpo_rows
        prepared = prepare(rows, tokenizer, max_length, source)
    if prepared.skipped:
        log.warning("%s: skipped %d of %d rows: %s", source, sum(prepared.skipped.values()),
                    len(rows), ", ".join(f"{k}={v}" for k, v in sorted(prepared.skipped.items())))
    if not prepared.rows:
        raise TrainingDataError(f"{source}: no trainable rows ({len(rows)} rows, skipped "
                                f"{prepared.skipped or 'none'}); nothing to train on")
    return prepared


@contextmanager
def compact_lm_head(device: str) -> Iterator[bool]:
    """Score only the positions with a label in trl's fused LM head, on CPU too.

    trl 1.16's fused head (`add_fused_lm_head`) projects and scores only the labelled positions
    on Triton devices, but every position elsewhere, so on CPU it computes the logits, entropy
    and top-1 of every prompt token, forward and backward, for nothing. The switch is trl's own
    `compact` path (its `_use_triton` answer, read per call), taken here for trl 1.16 only; on
    the sandbox machine the adapter is bit-for-bit the same and training ~5-10% faster
    (bench/round_bench.py). Yields whether it applied.
    """
    try:
        import trl
        import trl.trainer.utils as trl_utils
    except ImportError:  # pragma: no cover - trl is a dependency
        yield False
        return
    real = getattr(trl_utils, "_use_triton", None)
    if device.startswith("cuda") or real is None or not trl.__version__.startswith("1.16."):
        yield False
        return
    trl_utils._use_triton = lambda _device: True
    try:
        yield True
    finally:
        trl_utils._use_triton = real


def build_trainer(prepared: PreparedData, *, base_model: str | Path, tokenizer: Any,
                  training: Any, max_length: int, method: Literal["sft", "dpo"],
                  output_dir: str | Path, device: str | None = None, dtype: str = "auto",
                  progress: bool = True, world_size: int = 1, model: Any = None,
                  packed: bool | None = None, threads: int | None = None) -> Any:
    """A trl SFTTrainer/DPOTrainer over fresh base weights with a new LoRA adapter
    (`world_size`: the ranks it runs as under the accelerate launcher). Given `model` (a
    PEFT model from an SFT stage), DPO trains that adapter on, against a frozen copy of it.
    `packed` (DPO): one packed row per pair (`packed_pairs`) - None where the model allows
    it, True required, False trl's own layout. `threads`: the CPU intra-op threads of DPO's
    reference pass, which runs in the constructor (as `_train_stage` sets them for the steps)."""
    from datasets import Dataset

    from mosaic.training.models import (count_parameters, cpu_threads, load_model, pick_device,
                                        pick_dtype)
    from mosaic.training.settings import trainer_settings

    device = pick_device(device)
    # Under FSDP each rank loads the weights into CPU memory and the trainer's `fully_shard`
    # moves only its shard to the GPU: the model need not fit one GPU.
    fsdp = bool(getattr(training, "fsdp", False))
    continuing = model is not None
    if model is None:
        model = load_model(base_model, device="cpu" if fsdp else device, trainable=True,
                           dtype=str(pick_dtype(dtype, device)).removeprefix("torch."))
    args, lora = trainer_settings(
        training, method=method, output_dir=str(output_dir), max_length=max_length,
        device=device, n_rows=len(prepared.rows), n_params=count_parameters(model),
        progress=progress, world_size=world_size)
    dataset = Dataset.from_list(prepared.rows)
    if method == "sft":
        from trl import SFTTrainer

        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset,
                             processing_class=tokenizer, peft_config=lora)
    else:
        from mosaic.training.packed_pairs import PackedPairCollator, unsupported_reason

        # One packed row per pair (the prompt encoded once, in the reference pass and in
        # training) where the model and settings allow it; trl's two rows per pair otherwise.
        if packed is None and not getattr(training, "dpo_packed", True):
            packed = False
        why_not = unsupported_reason(model, args) if packed is not False else \
            "training.dpo_packed is false"
        if packed and why_not:
            raise ValueError(f"packed DPO pairs are not possible here: {why_not}")
        collator = None
        if why_not is None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
                else tokenizer.eos_token_id
            collator = PackedPairCollator(pad_token_id=pad, max_length=args.max_length)
        else:
            log.info("DPO pairs as trl's two rows each: %s", why_not)
        # Continuing an adapter, trl copies it as the frozen "ref" adapter the reference
        # log-probs come from; a fresh one's reference is the base (adapter disabled). The
        # reference pass runs on the threads the steps get, not torch's default (every core):
        # on the busy 2-core sandbox machine its CPU seconds went 12.1 -> 9.1 (load 7.5,
        # bench/dpo_profile.py), a second thread sharing its core stalling every op.
        with cpu_threads(count_parameters(model), device, threads):
            trainer = _LengthGroupedDPO(model=model, args=args, train_dataset=dataset,
                                        processing_class=tokenizer, data_collator=collator,
                                        peft_config=None if continuing else lora,
                                        packed_attention=None if why_not else
                                        model.config._attn_implementation)
    if not progress:
        # Without its bar, Trainer prints every log dict to stdout instead: quiet means quiet.
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def _length_grouped_dpo() -> type:
    from trl import DPOTrainer

    from mosaic.training.packed_pairs import PackedForward, trl_view

    class LengthGroupedDPO(DPOTrainer):
        """trl's DPOTrainer drawing batches of pairs of similar length, as SFT's
        `group_by_length` does: a batch pads both answers of every pair to its longest
        sequence, and pairs here run from tens to hundreds of tokens. The trainer's
        column pruning drops any length column before the sampler is built, so the lengths
        are read from the tokenized dataset it keeps (prompt + the longer answer).

        With `packed_attention` (the model's attention implementation) batches are packed
        pairs (`packed_pairs.PackedPairCollator`): the reference pass and every step run the
        packed rows through the model, and trl's own loss code takes the per-token
        log-probs from there, laid out as its two rows per pair. The reference log-probs
        stay in memory on every rank (`reference_log_probs`), not in trl's cache file."""

        def __init__(self, *args: Any, packed_attention: str | None = None,
                     **kwargs: Any) -> None:
            # Set first: the reference pass runs inside trl's constructor.
            self.packed_attention = packed_attention
            super().__init__(*args, **kwargs)

        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            return reference_log_probs(self, dataset, name, batch_size)

        def compute_ref_log_probs(self, model: Any, inputs: Any) -> Any:
            if self.packed_attention is None:
                return super().compute_ref_log_probs(model, inputs)
            return super().compute_ref_log_probs(
                PackedForward(model, inputs, self.packed_attention), trl_view(inputs))

        def _compute_loss(self, model: Any, inputs: Any, return_outputs: bool) -> Any:
            if self.packed_attention is None:
                return super()._compute_loss(model, inputs, return_outputs)
            if return_outputs:
                raise ValueError("packed DPO pairs give the loss only, not logits: evaluate "
                                 "with prediction_loss_only")
            return super()._compute_loss(PackedForward(model, inputs, self.packed_attention),
                                         trl_view(inputs), False)

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            from transformers.trainer_pt_utils import LengthGroupedSampler

            ds = self.train_dataset
            lengths = [len(p) + max(len(c), len(r)) for p, c, r in
                       zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                lengths=lengths)

    return LengthGroupedDPO


def reference_log_probs(trainer: Any, dataset: Any, name: str, batch_size: int) -> Any:
    """`dataset` with trl's `ref_chosen_logps` / `ref_rejected_logps` columns, computed once by
    the DPO trainer's reference model and kept in memory on every rank (our DPO trainer's
    `_precompute_ref_logps`).

    trl 1.16 has rank 0 write the log-probs to a `datasets` cache file that every rank then
    reads back. For an in-memory dataset (ours) that file lands in rank 0's own temporary
    folder, so under the accelerate launcher rank 1 failed with FileNotFoundError, and ranks on
    different machines share no folder at all. Here each rank forwards its share of the batches
    and `gather_for_metrics` hands every rank all the log-probs in dataset order (the repeats
    that even out the last batch over ranks dropped), so each rank adds the columns itself: no
    file, no barrier. The same code runs in process (one rank)."""
    import torch
    from accelerate.utils import tqdm
    from datasets import Dataset, concatenate_datasets
    from torch.utils.data import DataLoader

    if trainer.is_deepspeed_enabled:
        # trl wraps the model in a DeepSpeed inference engine here; the launcher runs DDP or
        # FSDP only, so that path is not carried over.
        raise ValueError("the in-memory DPO reference pass does not support DeepSpeed")
    accelerator, args = trainer.accelerator, trainer.args
    loader = accelerator.prepare(DataLoader(
        dataset, batch_size=batch_size, collate_fn=trainer.data_collator,
        num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
        shuffle=False))
    model = trainer.ref_model or trainer.model
    chosen: list[torch.Tensor] = []
    rejected: list[torch.Tensor] = []
    for batch in tqdm(loader, desc=f"Computing reference log probs for {name} dataset",
                      disable=bool(os.environ.get("TQDM_DISABLE", ""))):
        c, r = accelerator.gather_for_metrics(trainer.compute_ref_log_probs(model, batch))
        chosen.append(c.cpu())
        rejected.append(r.cpu())
    ref_chosen, ref_rejected = torch.cat(chosen), torch.cat(rejected)
    if len(ref_chosen) != len(dataset) or len(ref_rejected) != len(dataset):
        raise RuntimeError(f"the reference pass over the {name} dataset gave "
                           f"{len(ref_chosen)}/{len(ref_rejected)} log-probs for "
                           f"{len(dataset)} pairs")
    columns = Dataset.from_dict({"ref_chosen_logps": ref_chosen.numpy(),
                                 "ref_rejected_logps": ref_rejected.numpy()})
    return concatenate_datasets([dataset, columns], axis=1)


def _LengthGroupedDPO(**kwargs: Any) -> Any:  # noqa: N802 - stands for the class
    return _length_grouped_dpo()(**kwargs)


@contextmanager
def _datasets_bars(show: bool) -> Iterator[None]:
    """`datasets` progress bars (trl's tokenizing passes) on or off, restored afterwards."""
    from datasets.utils import logging as ds_logging

    before = ds_logging.is_progress_bar_enabled()
    (ds_logging.enable_progress_bar if show else ds_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (ds_logging.enable_progress_bar if before else ds_logging.disable_progress_bar)()


def by_length(prepared: PreparedData) -> PreparedData:
    """Rows sorted by token length (stable), when the lengths are known."""
    if len(prepared.lengths) != len(prepared.rows):
        return prepared
    order = sorted(range(len(prepared.rows)), key=lambda i: prepared.lengths[i])
    return PreparedData([prepared.rows[i] for i in order], prepared.tokens,
                        [prepared.lengths[i] for i in order], prepared.skipped)


def sft_rows_of_pairs(prepared: PreparedData) -> PreparedData:
    """The SFT stage of `sft+dpo`: each pair's prompt + chosen answer as one conversation."""
    rows = [{"messages": r["prompt"] + r["chosen"]} for r in prepared.rows]
    return PreparedData(rows, prepared.tokens, prepared.lengths)


def _train_stage(trainer: Any, threads: int | None) -> float | None:
    from mosaic.training.models import count_parameters, cpu_threads

    with cpu_threads(count_parameters(trainer.model), str(trainer.args.device),
                     threads) as policy:
        if policy is not None and policy.adaptive:
            from mosaic.training.threads import trainer_callback

            trainer.add_callback(trainer_callback(policy))
        with compact_lm_head(str(trainer.args.device)):
            out = trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return losses[-1] if losses else out.training_loss


def fit(prepared: PreparedData, staged: Path, *, base_model: str | Path, tokenizer: Any,
        training: Any, max_length: int, method: Method, output_dir: str | Path,
        device: str | None = None, dtype: str = "auto", progress: bool = True,
        threads: int | None = None, world_size: int = 1) -> tuple[int, float | None]:
    """Train a fresh adapter on `prepared` and save it (PEFT files only) into `staged`; returns
    (optimiser steps, last logged loss). One rank of several when `world_size` > 1 (the
    accelerate launcher runs this on each): losses are averaged over ranks, rank 0 saves."""
    common = dict(base_model=base_model, tokenizer=tokenizer, training=training,
                  max_length=max_length, device=device, dtype=dtype, progress=progress,
                  world_size=world_size)
    sft_data, dpo_data = stage_data(prepared, method)
    steps = 0
    trainer = None
    if sft_data is not None:
        with _datasets_bars(progress):
            trainer = build_trainer(sft_data, method="sft", output_dir=Path(output_dir) / "sft",
                                    **common)
        final_loss = _train_stage(trainer, threads)
        steps = trainer.state.global_step
    if dpo_data is not None:
        from mosaic.training.models import pick_device

        # After an SFT stage, DPO trains the same adapter on, against a frozen copy of it.
        model = trainer.model if trainer is not None else None
        # The reference pass runs in the trainer's constructor, over the dataset in order and
        # in batches of 64: pairs sorted by length pad far less (the training sampler
        # shuffles anyway), and the compact LM head scores only the answers' positions there too.
        with _datasets_bars(progress), compact_lm_head(pick_device(device)):
            trainer = build_trainer(by_length(dpo_data), method="dpo", output_dir=output_dir,
                                    model=model, threads=threads, **common)
        final_loss = _train_stage(trainer, threads)
        steps += trainer.state.global_step
    assert trainer is not None  # load_prepared never returns an empty set
    if getattr(training, "fsdp", False):
        # Every rank takes part in gathering the sharded adapter; rank 0 writes it. Only the
        # PEFT files are kept, so the folder is the in-process trainer's.
        trainer.save_model(str(staged))
        if trainer.is_world_process_zero():
            for extra in staged.iterdir():
                if not (extra.name.startswith("adapter_") or extra.name == "README.md"):
                    (shutil.rmtree if extra.is_dir() else Path.unlink)(extra)
    elif trainer.is_world_process_zero():
        # Only the trained adapter: an `sft+dpo` model also holds trl's frozen "ref" copy.
        trainer.model.save_pretrained(staged, selected_adapters=["default"])
    return steps, final_loss


def train_adapter(data: str | Path | Rows, *, base_model: str | Path, adapter_dir: str | Path,
                  training: Any, max_length: int, method: Method | None = None,
                  device: str | None = None, dtype: str = "auto",
                  progress: bool = True, threads: int | None = None) -> TrainResult:
    """Train a fresh LoRA adapter on `data` from the base weights and save it to `adapter_dir`.

    `training` is the run's `TrainingConfig`; `method` overrides its method (a data action picks
    it per round). `threads` (the config's runtime.threads) sets the CPU intra-op threads, None
    the policy (`models.cpu_threads`). The adapter directory appears complete or not at all,
    with `train_result.json` beside the standard PEFT files.
    """
    from mosaic.training.models import check_model_dir, load_tokenizer

    start = time.perf_counter()
    method = method or training.method
    if method not in METHODS:
        raise ValueError(f"unknown training method {method!r}; expected one of {METHODS}")
    tokenizer = load_tokenizer(check_model_dir(base_model))
    prepared = load_prepared(data, tokenizer, max_length, method)
    adapter_dir = Path(adapter_dir)
    adapter_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(adapter_dir)
    # The pid in the name tells a later call whether the process that staged here is gone.
    work = Path(tempfile.mkdtemp(prefix=f".{adapter_dir.name}.train-{os.getpid()}-",
                                 dir=adapter_dir.parent))
    try:
        staged = work / "adapter"
        if getattr(training, "launcher", "inprocess") == "accelerate":
            from mosaic.training.launch import fit_distributed

            steps, final_loss = fit_distributed(
                data, work, staged, base_model=base_model, training=training,
                max_length=max_length, method=method, device=device, dtype=dtype,
                threads=threads)
        else:
            steps, final_loss = fit(prepared, staged, base_model=base_model,
                                    tokenizer=tokenizer, training=training,
                                    max_length=max_length, method=method,
                                    output_dir=work / "trainer", device=device, dtype=dtype,
                                    progress=progress, threads=threads)
        result = TrainResult(
            method=method, base_model=str(base_model), adapter_dir=str(adapter_dir),
            train_tokens=prepared.tokens, train_rows=len(prepared.rows),
            steps=steps,
            final_loss=None if final_loss is None or math.isnan(final_loss) else float(final_loss),
            seconds=round(time.perf_counter() - start, 3), skipped=prepared.skipped)
        atomic_write_json(staged / "train_result.json", result)
        publish_dir(staged, adapter_dir)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def remove_stale_staging(adapter_dir: str | Path) -> list[Path]:
    """Remove staging folders of `adapter_dir` left by a training process that died (SIGKILL,
    OOM, power loss skip `train_adapter`'s cleanup); returns what was removed.

    Only this adapter's folders are touched: `.<name>.train-<pid>-<random>` whose process is no
    longer alive (another process training the same adapter keeps its folder), and
    `.<name>.train-<random>` from versions that did not record the pid, plus `.<name>.old-*`
    left between the two renames of `publish_dir` (never read again once the new one is in).
    """
    adapter_dir = Path(adapter_dir)
    name = re.escape(adapter_dir.name)
    with_pid = re.compile(rf"\.{name}\.train-(\d+)-[a-z0-9_]+")
    legacy = re.compile(rf"\.{name}\.(train-[a-z0-9_]{{8}}|old-[0-9a-f]{{8}})")
    removed = []
    if not adapter_dir.parent.is_dir():
        return removed
    for path in adapter_dir.parent.iterdir():
        if not path.is_dir() or path.is_symlink():
            continue
        m = with_pid.fullmatch(path.name)
        if (m and not _pid_alive(int(m.group(1)))) or (not m and legacy.fullmatch(path.name)):
            log.warning("removing %s: left by a training run that did not finish", path)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


