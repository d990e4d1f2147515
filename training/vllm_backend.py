"""Inference through vLLM's offline engine (optional: only when vllm is installed, GPU machines).

One engine per process serves a whole round: the base weights are loaded once, with LoRA
enabled, and every adapter (eval and held-out of every round) is a `LoRARequest` on top of them,
so `evaluate()` called twice per round no longer builds two engines. Before training the
engine is released (`release_engines`, called by the train stage), since a vLLM engine holds
most of the GPU's memory and the trainer in the same process would run out of it.

Prompts are formatted and cut exactly as the transformers backend does (`inference.prompt_ids`:
the model's chat template, the end kept when a prompt exceeds max positions minus new tokens)
and passed to vLLM as token ids, so both backends see identical inputs.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mosaic.training.inference import Conversation, prompt_ids

if TYPE_CHECKING:
    from mosaic.config import MosaicConfig

log = logging.getLogger("mosaic.inference")

# Ranks vLLM accepts for `max_lora_rank`; an adapter's rank is rounded up to one of these.
_VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class VLLMUnavailableError(RuntimeError):
    """vllm is not installed (it needs a CUDA machine)."""


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise VLLMUnavailableError(
            "inference.backend is 'vllm' but the vllm package is not installed "
            f"({e}); install it on a CUDA machine with `pip install 'mosaic-curation[vllm]'`, "
            "or set inference.backend: transformers") from None
    return vllm


def lora_rank_slot(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds an adapter of `rank`."""
    return next((r for r in _VLLM_LORA_RANKS if r >= rank), rank)


def max_positions(model_dir: str | Path) -> int | None:
    """The model's position limit, as the transformers backend reads it."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    return getattr(config, "max_position_embeddings", None)


@dataclass
class _Engine:
    key: tuple[Any, ...]
    llm: Any
    max_lora_rank: int
    adapters: dict[tuple[str, str], Any]  # (path, fingerprint) -> LoRARequest


_ENGINE: _Engine | None = None  # one per process: the GPU holds one


def release_engines() -> bool:
    """Tear down this process's vLLM engine and give its GPU memory back (before training);
    True when there was one."""
    global _ENGINE
    if _ENGINE is None:
        return False
    engine, _ENGINE = _ENGINE, None
    llm = engine.llm
    del engine
    try:
        from vllm.distributed.parallel_state import (destroy_distributed_environment,
                                                     destroy_model_parallel)

        # The engine core runs in its own process (vLLM V1); shutting it down frees its memory.
        shutdown = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if shutdown is not None and hasattr(shutdown, "shutdown"):
            shutdown.shutdown()
        del llm
        destroy_model_parallel()
        destroy_distributed_environment()
    except ImportError:  # pragma: no cover - vllm is installed when an engine existed
        del llm
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
    log.info("released the vLLM engine")
    return True


def _engine(model_dir: str, *, dtype: str, seed: int, max_model_len: int | None,
            gpu_memory_utilization: float, lora_rank: int) -> _Engine:
    """This process's engine for the model, built on first use (or rebuilt for another model or
    a larger adapter rank)."""
    global _ENGINE
    key = (model_dir, dtype, seed, max_model_len, gpu_memory_utilization)
    if _ENGINE is not None and _ENGINE.key == key and _ENGINE.max_lora_rank >= lora_rank:
        return _ENGINE
    release_engines()
    vllm = _import_vllm()
    slot = lora_rank_slot(lora_rank)
    log.info("starting the vLLM engine for %s (LoRA rank up to %d)", model_dir, slot)
    llm = vllm.LLM(model=model_dir, dtype=dtype, seed=seed, max_model_len=max_model_len,
                   gpu_memory_utilization=gpu_memory_utilization, enable_lora=True,
                   max_loras=1, max_lora_rank=slot)
    _ENGINE = _Engine(key=key, llm=llm, max_lora_rank=slot, adapters={})
    return _ENGINE


class VLLMBackend:
    """`InferenceBackend` over the process's shared vLLM engine, with an optional adapter."""

    name = "vllm"

    def __init__(self, model_dir: str | Path, *, adapter_dir: str | Path | None = None,
                 config: "MosaicConfig | None" = None, dtype: str | None = None,
                 seed: int | None = None, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.85, progress: bool = False) -> None:
        _import_vllm()
        from vllm.lora.request import LoRARequest

        from mosaic.markers import dir_fingerprint
        from mosaic.training.models import check_adapter_dir, check_model_dir, load_tokenizer

        dtype = dtype or (config.model.dtype if config else "auto")
        seed = seed if seed is not None else (config.seed if config else 0)
        self.model_dir = str(check_model_dir(model_dir))
        self.tokenizer = load_tokenizer(self.model_dir)
        self.max_positions = max_positions(self.model_dir)
        self.dtype = dtype
        self.seed = seed
        self.progress = progress
        adapter_rank = 0
        adapter = None
        if adapter_dir is not None:
            adapter = check_adapter_dir(adapter_dir)
            adapter_rank = int(json.loads((adapter / "adapter_config.json").read_text())["r"])
        # Room for this run's adapters from the first (baseline) engine on.
        planned = config.training.lora_r if config is not None else 0
        self.engine = _engine(self.model_dir, dtype=dtype, seed=seed,
                              max_model_len=max_model_len or self.max_positions,
                              gpu_memory_utilization=gpu_memory_utilization,
                              lora_rank=max(adapter_rank, planned, 1))
        self.lora_request = None
        if adapter is not None:
            # vLLM caches an adapter by its integer id: a retrained adapter at the same path
            # has other weights, so the id follows the content.
            key = (str(adapter.resolve()), dir_fingerprint(adapter) or "")
            if key not in self.engine.adapters:
                self.engine.adapters[key] = LoRARequest(
                    f"{adapter.name}-{len(self.engine.adapters) + 1}",
                    len(self.engine.adapters) + 1, key[0])
            self.lora_request = self.engine.adapters[key]
        self._sampling_params = _import_vllm().SamplingParams
        # The transformers backend's end tokens: the template's end of turn and any the
        # model's generation config names.
        from transformers import GenerationConfig

        try:
            gen_eos = GenerationConfig.from_pretrained(self.model_dir).eos_token_id
        except OSError:
            gen_eos = None
        gen_eos = [] if gen_eos is None else [gen_eos] if isinstance(gen_eos, int) else gen_eos
        self.stop_ids = list(dict.fromkeys([self.tokenizer.eos_token_id, *gen_eos]))

    def identity(self) -> dict[str, Any]:
        """What besides the weights determines the outputs (for cache keys)."""
        return {"backend": self.name, "dtype": self.dtype, "seed": self.seed}

    def prompts(self, conversations: Sequence[Conversation], max_new_tokens: int
                ) -> list[list[int]]:
        """The token ids vLLM is given: the transformers backend's, cut the same way."""
        ids, cut = prompt_ids(self.tokenizer, conversations, max_new_tokens=max_new_tokens,
                              max_positions=self.max_positions)
        if cut:
            log.warning("%d prompt(s) longer than %d tokens were cut from the left", cut,
                        (self.max_positions or 0) - max_new_tokens)
        return ids

    def generate(self, conversations: Sequence[Conversation], *, max_new_tokens: int,
                 temperature: float = 0.0) -> list[str]:
        if not conversations:
            return []
        params = self._sampling_params(
            max_tokens=max_new_tokens, temperature=temperature,
            seed=self.seed if temperature > 0 else None,
            stop_token_ids=self.stop_ids, skip_special_tokens=True)
        outputs = self.engine.llm.generate(
            [{"prompt_token_ids": ids} for ids in self.prompts(conversations, max_new_tokens)],
            params, lora_request=self.lora_request, use_tqdm=self.progress)
        return [o.outputs[0].text.strip() for o in outputs]
