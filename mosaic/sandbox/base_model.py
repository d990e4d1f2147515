"""The run's base model: the sandbox's tiny vulnerable model (trained once from the world's
base corpus by `mosaic.training.base_model` and cached by content hash), a GGUF file converted
once into a local model directory (`mosaic.training.gguf_convert`), or the local Hugging Face
directory `model.base` names."""

from __future__ import annotations

from pathlib import Path

from mosaic.config import MosaicConfig
from mosaic.sandbox.world import ensure_world
from mosaic.training.base_model import BaseModelError, BaseModelInfo, BaseModelSpec, build_base_model
from mosaic.training.gguf_convert import ensure_converted, is_gguf_source
from mosaic.training.models import check_model_dir


def sandbox_base_model(config: MosaicConfig, *, progress: bool = True) -> BaseModelInfo:
    """The run's sandbox base model: cached under `model.cache_dir`, built on first use from the
    sandbox world's `base_corpus.parquet` and `tokenizer/` (the world is built first if needed)."""
    if config.world.kind != "sandbox":
        raise BaseModelError(f"model.base is 'sandbox' but world.kind is {config.world.kind!r}: "
                             f"the sandbox base model is trained on the sandbox world's corpus; "
                             f"set model.base to a local Hugging Face model directory")
    ensure_world(config.world)
    data_dir = Path(config.world.data_dir)
    corpus = data_dir / "base_corpus.parquet"
    tokenizer_dir = data_dir / "tokenizer"
    missing = [str(p) for p in (corpus, tokenizer_dir) if not p.exists()]
    if missing:
        raise BaseModelError(f"the sandbox world in {data_dir} lacks {', '.join(missing)}")
    spec = BaseModelSpec(max_length=config.model.max_length)
    return build_base_model(corpus, tokenizer_dir, config.model.cache_dir, spec=spec,
                            seed=config.world.seed, progress=progress)


def ensure_base_model(config: MosaicConfig, *, progress: bool = True) -> Path:
    """The base model directory of a run: the cached sandbox model (built on first use) when
    `model.base` is "sandbox", the converted directory (converted on first use) when it names a
    GGUF file, else the local Hugging Face directory it names."""
    if config.model.base == "sandbox":
        return sandbox_base_model(config, progress=progress).path
    if is_gguf_source(config.model.base):
        return ensure_converted(config.model.base, config.model.cache_dir,
                                progress=progress).path
    return check_model_dir(config.model.base)


def tokenizer_dir(config: MosaicConfig) -> Path:
    """Where a run's tokenizer lives, without building the model: the sandbox world's
    tokenizer (the sandbox base model is saved with that same tokenizer), the converted GGUF
    model's directory (converted on first use: its tokenizer is made in the conversion), or
    model.base."""
    if config.model.base == "sandbox":
        return ensure_world(config.world).tokenizer_dir
    if is_gguf_source(config.model.base):
        return ensure_converted(config.model.base, config.model.cache_dir, progress=False).path
    return check_model_dir(config.model.base)
