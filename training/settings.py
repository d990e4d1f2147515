"""The one mapping from MOSAIC's TrainingConfig onto trl's SFTConfig/DPOConfig and peft's LoraConfig.

trl's defaults target large models on GPUs. Measured with bench/train_generate_bench.py on the
2-core sandbox machine (3.4M-parameter model, LoRA r16, batch 16): these settings train at
~2.7k tokens/s against ~1.1-1.5k with trl's defaults and ~1.4-2.1k for a plain loop over random
batches. Nearly all of the gain is length-grouped batching (random batches pad to their longest
row); gradient checkpointing only recomputes; each override below says why.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from peft import LoraConfig
    from trl import DPOConfig, SFTConfig

    from mosaic.config import TrainingConfig

# Above this many parameters activations dominate memory and gradient checkpointing pays off;
# below it, it only recomputes the forward pass (trl turns it on by default).
CHECKPOINTING_MIN_PARAMS = 1_000_000_000


def batch_split(global_batch: int, world_size: int, accumulation: int) -> tuple[int, int]:
    """(rows per rank per micro-batch, accumulation steps) that keep the global batch the
    config's whatever the launcher: each of `world_size` ranks takes its share, accumulated
    over `accumulation` micro-batches."""
    per_device, rest = divmod(global_batch, world_size * accumulation)
    if rest or per_device < 1:
        raise ValueError(f"training.batch_size {global_batch} is not a multiple of "
                         f"{world_size} processes x {accumulation} accumulation steps")
    return per_device, accumulation


def trainer_settings(training: "TrainingConfig", *, method: Literal["sft", "dpo"],
                     output_dir: str, max_length: int, device: str, n_rows: int,
                     n_params: int, progress: bool = True, world_size: int = 1,
                     ) -> tuple["SFTConfig | DPOConfig", "LoraConfig"]:
    """trl trainer arguments and the LoRA config for one training run (`world_size`: the
    ranks it runs as, under the accelerate launcher)."""
    import dataclasses

    import torch
    from peft import LoraConfig
    from transformers import TrainingArguments

    on_cuda = device.startswith("cuda")
    bf16 = on_cuda and torch.cuda.is_bf16_supported()
    steps = max(1, math.ceil(n_rows / training.batch_size) * training.epochs)
    per_device, accumulation = batch_split(training.batch_size, world_size,
                                           getattr(training, "gradient_accumulation", 1))
    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        learning_rate=training.learning_rate,
        num_train_epochs=training.epochs,
        lr_scheduler_type="cosine",
        warmup_steps=training.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=training.seed,
        data_seed=training.seed,
        max_length=max_length,
        # trl defaults bf16 to True whatever the device. On CPU we keep float32: the sandbox's
        # learning rates were calibrated in it, and bf16 autocast is slow on CPUs without AMX
        # (on this AMX Xeon it was ~25% faster; set model.dtype to change the weights' dtype).
        bf16=bf16,
        fp16=on_cuda and not bf16,
        use_cpu=not on_cuda,
        dataloader_num_workers=0,  # worker processes cost more than collating tiny batches
        dataloader_pin_memory=on_cuda,
        logging_steps=max(1, min(10, round(steps / 10))),
        save_strategy="no",  # the adapter is saved once, atomically, by the caller
        eval_strategy="no",
        report_to="none",
        disable_tqdm=not progress,
    )
    # Recomputing activations costs ~1 extra forward per step: only worth it for big models.
    # (transformers 5 renamed the flag; trl's own default of True would otherwise win.)
    checkpointing = n_params >= CHECKPOINTING_MIN_PARAMS
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    flag = ("activation_checkpointing" if "activation_checkpointing" in names
            else "gradient_checkpointing")
    common[flag] = checkpointing
    if world_size > 1:
        common["ddp_backend"] = "nccl" if on_cuda else "gloo"
        # LoRA: every adapter weight gets a gradient each step, so no search for unused ones.
        common["ddp_find_unused_parameters"] = False
    if getattr(training, "fsdp", False):
        # FSDP2 (`fully_shard`): weights, gradients and optimiser state sharded over the ranks,
        # one unit per decoder layer (the model's `_no_split_modules`); the adapter is gathered
        # whole on rank 0 when saved. Checkpointing goes through FSDP's own wrapper (the
        # trainer's flag would add an all-gather in the backward pass).
        common["fsdp"] = True
        common["fsdp_config"] = {"version": 2, "reshard_after_forward": True,
                                 "state_dict_type": "FULL_STATE_DICT",
                                 "activation_checkpointing": checkpointing}
        common[flag] = False
    lora = LoraConfig(
        r=training.lora_r,
        lora_alpha=training.lora_alpha,
        lora_dropout=training.lora_dropout,
        target_modules="all-linear",  # every linear layer except the output head
        bias="none",
        task_type="CAUSAL_LM",
    )
    if method == "sft":
        from trl import SFTConfig

        args = SFTConfig(
            **common,
            assistant_only_loss=True,
            packing=False,
            padding_free=False,  # needs FlashAttention; with SDPA it would mix sequences
            # Batches of similar length waste less compute on padding (SFT rows vary 30-300
            # tokens); the sampler still shuffles which batches come first.
            train_sampling_strategy="group_by_length",
        )
    elif method == "dpo":
        from trl import DPOConfig

        sft_weight = getattr(training, "dpo_sft_weight", 0.0)
        losses = [getattr(training, "dpo_loss", "sigmoid")] + (["sft"] if sft_weight else [])
        if getattr(training, "dpo_learning_rate", None) is not None:
            common["learning_rate"] = training.dpo_learning_rate
        # DPO rows have no `input_ids` column for a length-grouped sampler to read.
        args = DPOConfig(
            **common, beta=training.dpo_beta, loss_type=losses,
            loss_weights=[1.0, sft_weight] if sft_weight else None,
            ld_alpha=getattr(training, "dpo_length_alpha", None),
            # The reference's log-probs once per pair, before the first step, in large no-grad
            # batches: without it every step runs a second forward pass (adapter disabled) over
            # the same batch, and every epoch again.
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=max(64, per_device),
        )
    else:
        raise ValueError(f"unknown training method {method!r}; expected 'sft' or 'dpo'")
    return args, lora
