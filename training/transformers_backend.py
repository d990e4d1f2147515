"""The default inference backend: batched `generate` with transformers (+ an optional LoRA adapter).

Prompts are sorted by length so each batch pads little, generated left-padded (decoder-only
models continue from the right edge), and answers are returned in the caller's order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mosaic.training.inference import Conversation

if TYPE_CHECKING:
    from mosaic.config import MosaicConfig

log = logging.getLogger("mosaic.inference")


@dataclass
class GenerationStats:
    """Counters of the last `generate` call (the benchmark reads them)."""

    prompts: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    padded_tokens: int = 0
    truncated_prompts: int = 0
    seconds: float = 0.0


class TransformersBackend:
    """Greedy (temperature 0) or seeded sampling; stops at the end-of-turn token."""

    name = "transformers"

    def __init__(self, model_dir: str | Path, *, adapter_dir: str | Path | None = None,
                 config: "MosaicConfig | None" = None, device: str | None = None,
                 dtype: str | None = None, batch_size: int | None = None,
                 seed: int | None = None, progress: bool = False) -> None:
        """Explicit arguments win; unset ones come from `config` (inference.batch_size,
        model.dtype, seed), else the defaults (64, auto, 0)."""
        from mosaic.training.models import (check_model_dir, count_parameters, load_model,
                                            load_tokenizer, pick_device, pick_dtype)

        batch_size = batch_size or (config.inference.batch_size if config else 64)
        dtype = dtype or (config.model.dtype if config else "auto")
        seed = seed if seed is not None else (config.seed if config else 0)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_dir = str(model_dir)
        self.adapter_dir = None if adapter_dir is None else str(adapter_dir)
        self.device = pick_device(device)
        self.dtype = str(pick_dtype(dtype, self.device)).removeprefix("torch.")
        self.tokenizer = load_tokenizer(check_model_dir(model_dir))
        self.model = load_model(model_dir, adapter=adapter_dir, device=self.device, dtype=dtype)
        self.n_params = count_parameters(self.model)
        self.batch_size = batch_size
        self.seed = seed
        self.progress = progress
        self.stats = GenerationStats()
        gen_eos = self.model.generation_config.eos_token_id
        gen_eos = [] if gen_eos is None else [gen_eos] if isinstance(gen_eos, int) else gen_eos
        # The chat template's end-of-turn token ends an answer; a model's own generation config
        # may name more (Llama 3 lists <|eot_id|> and <|end_of_text|>).
        self.eos_ids = list(dict.fromkeys([self.tokenizer.eos_token_id, *gen_eos]))
        self.pad_id = self.tokenizer.pad_token_id
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)

    def identity(self) -> dict[str, Any]:
        """What besides the weights determines the outputs (for cache keys): greedy decoding
        can differ between devices and dtypes."""
        return {"backend": self.name, "device": self.device.split(":")[0], "dtype": self.dtype,
                "seed": self.seed}

    def encode(self, conversations: Sequence[Conversation]) -> list[list[int]]:
        """Chat-formatted prompt token ids, ending with the assistant header."""
        enc = self.tokenizer.apply_chat_template(
            [list(c) for c in conversations], add_generation_prompt=True, tokenize=True,
            return_dict=True)
        return [list(ids) for ids in enc["input_ids"]]

    def generate(self, conversations: Sequence[Conversation], *, max_new_tokens: int,
                 temperature: float = 0.0) -> list[str]:
        import torch
        from transformers import GenerationConfig

        from mosaic.training.models import cpu_threads

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        start = time.perf_counter()
        stats = GenerationStats(prompts=len(conversations))
        if not conversations:
            self.stats = stats
            return []
        prompts = self.encode(conversations)
        limit = None if self.max_positions is None else self.max_positions - max_new_tokens
        if limit is not None and limit < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                             f"this model's {self.max_positions} positions")
        for i, ids in enumerate(prompts):
            if limit is not None and len(ids) > limit:
                # Keep the end: the latest turns and the assistant header the answer follows.
                prompts[i] = ids[-limit:]
                stats.truncated_prompts += 1
        if stats.truncated_prompts:
            log.warning("%d prompt(s) longer than %d tokens were cut from the left",
                        stats.truncated_prompts, limit)

        sampling = temperature > 0
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=sampling,
            temperature=temperature if sampling else None, top_p=1.0 if sampling else None,
            top_k=0 if sampling else None, eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        if sampling:
            torch.manual_seed(self.seed)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
        replies: list[str | None] = [None] * len(prompts)
        batches = [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        with _progress(self.progress, len(prompts)) as advance, torch.inference_mode(), \
                cpu_threads(self.n_params, self.device):
            for batch in batches:
                width = len(prompts[batch[0]])
                input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    ids = prompts[i]
                    input_ids[row, width - len(ids):] = torch.tensor(ids)
                    attention[row, width - len(ids):] = 1
                    stats.prompt_tokens += len(ids)
                stats.padded_tokens += len(batch) * width
                out = self.model.generate(input_ids=input_ids.to(self.device),
                                          attention_mask=attention.to(self.device),
                                          generation_config=config)
                for row, i in enumerate(batch):
                    new = out[row, width:].tolist()
                    cut = next((k for k, t in enumerate(new) if t in self.eos_ids), None)
                    stats.new_tokens += len(new) if cut is None else cut + 1
                    new = new if cut is None else new[:cut]
                    replies[i] = self.tokenizer.decode(new, skip_special_tokens=True).strip()
                advance(len(batch))
        stats.seconds = time.perf_counter() - start
        self.stats = stats
        return [r if r is not None else "" for r in replies]


class _progress:
    """A rich progress bar over prompts, or nothing."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total, self.bar = enabled, total, None

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import Progress

        self.bar = Progress(transient=True)
        self.bar.start()
        task = self.bar.add_task("generating", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
