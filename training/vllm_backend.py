"""Inference through vLLM's offline engine (optional: only when vllm is installed, GPU machines).

Prompts are formatted with the model's own chat template here, exactly as the transformers
backend does, and passed to vLLM as token ids, so both backends see identical inputs. A round's
adapter is served with a `LoRARequest` on top of the base weights.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mosaic.training.inference import Conversation

if TYPE_CHECKING:
    from mosaic.config import MosaicConfig

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


class VLLMBackend:
    name = "vllm"

    def __init__(self, model_dir: str | Path, *, adapter_dir: str | Path | None = None,
                 config: "MosaicConfig | None" = None, dtype: str | None = None,
                 seed: int | None = None, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.85, progress: bool = False) -> None:
        vllm = _import_vllm()
        from vllm.lora.request import LoRARequest

        from mosaic.training.models import check_adapter_dir, check_model_dir, load_tokenizer

        dtype = dtype or (config.model.dtype if config else "auto")
        seed = seed if seed is not None else (config.seed if config else 0)
        self.tokenizer = load_tokenizer(check_model_dir(model_dir))
        self.dtype = dtype
        self.seed = seed
        self.progress = progress
        self.lora_request = None
        lora_kwargs: dict[str, Any] = {}
        if adapter_dir is not None:
            adapter = check_adapter_dir(adapter_dir)
            rank = int(json.loads((adapter / "adapter_config.json").read_text())["r"])
            lora_kwargs = {"enable_lora": True, "max_loras": 1,
                           "max_lora_rank": next((r for r in _VLLM_LORA_RANKS if r >= rank),
                                                 rank)}
            # vLLM caches adapters by integer id; one engine serves one adapter, so id 1.
            self.lora_request = LoRARequest(adapter.name, 1, str(adapter.resolve()))
        self.llm = vllm.LLM(model=str(model_dir), dtype=dtype, seed=seed,
                            max_model_len=max_model_len,
                            gpu_memory_utilization=gpu_memory_utilization, **lora_kwargs)
        self._sampling_params = vllm.SamplingParams

    def identity(self) -> dict[str, Any]:
        """What besides the weights determines the outputs (for cache keys)."""
        return {"backend": self.name, "dtype": self.dtype, "seed": self.seed}

    def generate(self, conversations: Sequence[Conversation], *, max_new_tokens: int,
                 temperature: float = 0.0) -> list[str]:
        if not conversations:
            return []
        enc = self.tokenizer.apply_chat_template(
            [list(c) for c in conversations], add_generation_prompt=True, tokenize=True,
            return_dict=True)
        params = self._sampling_params(
            max_tokens=max_new_tokens, temperature=temperature,
            seed=self.seed if temperature > 0 else None,
            stop_token_ids=[self.tokenizer.eos_token_id], skip_special_tokens=True)
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(ids)} for ids in enc["input_ids"]], params,
            lora_request=self.lora_request, use_tqdm=self.progress)
        return [o.outputs[0].text.strip() for o in outputs]
