"""Loading a base model (and optionally a round's LoRA adapter) on the right device and dtype.

Everything loads from local directories only (`local_files_only=True`): the sandbox has no hub
access, and a run must never silently download weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch stays out of module import time (`mosaic --help` must be instant)
    import torch


from mosaic.training.threads import SMALL_MODEL_PARAMS, ThreadPolicy

__all__ = ["SMALL_MODEL_PARAMS", "ModelLoadError", "cpu_threads", "load_model", "load_tokenizer"]


class ModelLoadError(ValueError):
    """A model or adapter directory is missing or incomplete; the message names the path."""


def pick_device(device: str | None = None) -> str:
    """`device` if given, else CUDA when present, else CPU."""
    import torch

    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} was requested but CUDA is not available")
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str, device: str) -> "torch.dtype":
    """Resolve the config's dtype name. `auto`: float32 on CPU (the sandbox was calibrated in
    float32, and bf16 is slow on CPUs without AMX), bfloat16 on GPUs that support it, else
    float16."""
    import torch

    if dtype != "auto":
        try:
            return {"float32": torch.float32, "bfloat16": torch.bfloat16,
                    "float16": torch.float16}[dtype]
        except KeyError:
            raise ModelLoadError(f"unknown dtype {dtype!r}; expected auto, float32, bfloat16 "
                                 f"or float16") from None
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def check_model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model directory not found: {path} (model.base must be 'sandbox', "
                             f"a local Hugging Face model directory or a GGUF file)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face model directory: no config.json")
    return path


def check_adapter_dir(path: str | Path) -> Path:
    path = Path(path)
    missing = [n for n in ("adapter_config.json", "adapter_model.safetensors")
               if not (path / n).is_file()]
    if missing:
        raise ModelLoadError(f"{path} is not a PEFT adapter directory: missing {', '.join(missing)}")
    return path


def load_tokenizer(model_dir: str | Path):
    """The tokenizer in a model directory (or a tokenizer-only directory, such as the sandbox
    world's), checked for what token counting, generation and training rely on."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"tokenizer directory not found: {model_dir}")
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if not tok.chat_template:
        raise ModelLoadError(f"tokenizer in {model_dir} has no chat template; MOSAIC formats every "
                             f"sample with the model's own chat template")
    if tok.eos_token_id is None:
        raise ModelLoadError(f"tokenizer in {model_dir} has no eos token (the end-of-turn token)")
    if tok.pad_token_id is None:
        # Llama-style tokenizers often ship without a pad token; eos is the usual stand-in and is
        # always masked out by the attention mask.
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_dir: str | Path, *, adapter: str | Path | None = None,
               device: str | None = None, dtype: str = "auto", trainable: bool = False) -> Any:
    """Base model (+ optional LoRA adapter) on `device`, in eval mode unless `trainable`.

    Called fresh for every round, so each round starts from the same base weights.
    """
    from transformers import AutoModelForCausalLM

    model_dir = check_model_dir(model_dir)
    device = pick_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=pick_dtype(dtype, device), local_files_only=True)
    model.to(device)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, check_adapter_dir(adapter),
                                          is_trainable=trainable)
    if not trainable:
        model.eval()
    return model


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


@contextmanager
def cpu_threads(n_params: int, device: str, threads: int | None = None
                ) -> Iterator[ThreadPolicy | None]:
    """Run a CPU model on `threads` intra-op threads (the config's `runtime.threads`), or by
    the measured policy when None (`mosaic.training.threads`: every core while the machine is
    otherwise idle, one thread once other processes use it) for models below
    `SMALL_MODEL_PARAMS`; larger models with `threads` None, and GPUs, keep torch's default.
    Yields the policy (None when nothing is set), whose `recheck()` a long stage calls to
    follow the machine; the previous setting is restored afterwards."""
    import torch

    if device != "cpu" or (threads is None and n_params >= SMALL_MODEL_PARAMS):
        yield None
        return
    before = torch.get_num_threads()
    try:
        yield ThreadPolicy(threads)
    finally:
        torch.set_num_threads(before)
