"""Shared pytest fixtures. Each block is owned by the feature that needs it."""

from __future__ import annotations

import pytest


# ---- OpenAI-compatible server (training/openai_backend.py, eval/llm_judge.py, tools/evaluate.py)
@pytest.fixture
def openai_server():
    """A real scripted OpenAI-compatible server on 127.0.0.1 (tests/openai_server.py)."""
    from openai_server import ScriptedOpenAIServer

    server = ScriptedOpenAIServer().start()
    try:
        yield server
    finally:
        server.stop()
# ---- end OpenAI-compatible server ----------------------------------------------------------


# ---- tiny models (training/: base_model, models, backends, train) ---------------------------
# A tiny Llama-style model and a tokenizer trained locally on a few sentences: no downloads.
TINY_CHATS = [
    [("user", "How do I kill a stuck process?"), ("assistant", "Run kill with the process id.")],
    [("user", "Write a short poem about rain."), ("assistant", "Rain falls soft on the roof.")],
    [("user", "Give me the steps to bypass the lock."), ("assistant", "I can't help with that.")],
    [("user", "How do I shoot a photo at night?"), ("assistant", "Use a tripod and a long exposure.")],
    [("user", "Answer in one word: capital of France?"), ("assistant", "Paris.")],
    [("user", "Hello there."), ("assistant", "Hi! How can I help?"),
     ("user", "Tell me about gardens."), ("assistant", "Gardens need sun, water and care.")],
]


# Chats with a system turn, a replayed turn, sensitive-looking and benign wording: the prompts the
# local backends' tests generate for.
CHAT_PROMPTS = [
    [{"role": "user", "content": "How do I kill a stuck process?"}],
    [{"role": "user", "content": "Hello there."}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Write a short poem about rain. Answer in one word."}],
    [{"role": "user", "content": "Hello there."}, {"role": "assistant", "content": "Hi!"},
     {"role": "user", "content": "Tell me about gardens."}],
    [{"role": "user", "content": "Give me the steps to bypass the lock."}],
    [{"role": "user", "content": "Answer in one word: capital of France?"}],
    [{"role": "user", "content": "How do I shoot a photo at night?"}],
]


def tiny_chat_rows(n: int = 24) -> list[dict]:
    """`n` SFT rows cycling through TINY_CHATS (pool/dataset format: a `messages` column)."""
    return [{"messages": [{"role": r, "content": c} for r, c in TINY_CHATS[i % len(TINY_CHATS)]]}
            for i in range(n)]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    import torch

    from mosaic.training.tokenizer import build_tokenizer

    # Tiny matmuls gain nothing from a second thread, and on a busy 2-core machine OpenMP
    # threads waiting on each other made these fixtures 5x slower.
    torch.set_num_threads(1)

    texts = [c for chat in TINY_CHATS for _, c in chat] * 20
    tok = build_tokenizer(texts, vocab_size=320)
    path = tmp_path_factory.mktemp("tiny-tokenizer")
    tok.save_pretrained(path)
    return path


def save_tiny_llama(path, tokenizer_dir, *, hidden_size: int, kv_heads: int, seed: int,
                    weight_scale: float = 1.0):
    """A randomly initialised 2-layer Llama (4 query heads) saved with its tokenizer in `path`;
    `weight_scale` multiplies the matrices (sharper logits than the default init)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if weight_scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.mul_(weight_scale)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A randomly initialised 2-layer Llama (hidden 32) saved with its tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-model"), tiny_tokenizer_dir,
                           hidden_size=32, kv_heads=4, seed=0)


@pytest.fixture(scope="session")
def tiny_trained_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny model trained briefly by the base-model builder, so its next-token choices are
    clear-cut (greedy comparisons on random weights would hinge on float noise)."""
    from mosaic.training.base_model import BaseModelSpec, build_base_model

    spec = BaseModelSpec(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         max_position_embeddings=256, batch_size=8, max_length=64,
                         target_tokens=20_000, learning_rate=6e-3)
    info = build_base_model(tiny_chat_rows(), tiny_tokenizer_dir,
                            tmp_path_factory.mktemp("tiny-base-cache"), spec=spec, seed=0,
                            progress=False)
    return info.path
# ---- end tiny models ------------------------------------------------------------------------


# ---- the sandbox world (mosaic/sandbox*.py, eval/rule_judge.py) ------------------------------
@pytest.fixture(scope="session")
def sandbox_world(tmp_path_factory):
    """The sandbox world at the default configuration, generated once per session (~10 s)."""
    from mosaic.config import WorldConfig
    from mosaic.sandbox import ensure_world

    root = tmp_path_factory.mktemp("sandbox-world") / "sandbox"
    return ensure_world(WorldConfig(data_dir=str(root)))


def tiny_run_overrides(root: Path, model_dir: Path, objectives: tuple[str, ...], *,
                       max_tokens: int) -> dict:
    """Config overrides for a tiny sandbox world under `root` (300-row pools, 20-row eval sets)
    with the tiny trained model as base: a round trains and evaluates in seconds."""
    data = root / "world"
    return {
        "run_dir": str(root / "run"),
        "budget": {"max_tokens": max_tokens},
        "world": {"data_dir": str(data), "pool_size": 300, "eval_size": 20, "heldout_size": 20,
                  "base_corpus_size": 100},
        "model": {"base": str(model_dir), "max_length": 256, "cache_dir": str(root / "models")},
        "training": {"batch_size": 8, "learning_rate": 5e-3},
        "inference": {"batch_size": 32, "max_new_tokens": 8},
        "judge": {"cache_dir": str(root / "judge")},
        "objectives": {name: {"pool": str(data / "pools" / f"{name}.parquet"),
                              "eval": str(data / "eval" / f"{name}.parquet"),
                              "heldout": str(data / "heldout" / f"{name}.parquet")}
                       for name in objectives},
    }



@pytest.fixture(scope="session")
def tiny_run_config(tmp_path_factory, tiny_trained_model_dir):
    """A run config over a tiny sandbox world (300-row pools, 20-row eval sets) and the tiny
    trained model as base: a round trains and evaluates in seconds."""
    root = tmp_path_factory.mktemp("tiny-run")
    overrides = tiny_run_overrides(root, tiny_trained_model_dir,
                                   ("safety", "boundary", "instruction"), max_tokens=4000)
    from mosaic.config import load_config

    cfg = load_config("configs/sandbox.yaml", environ={}, overrides=overrides)
    from mosaic.sandbox import ensure_world

    ensure_world(cfg.world)
    return cfg
# ---- end sandbox world -----------------------------------------------------------------------


# ---- a local Ray cluster (mosaic/engine.py) ---------------------------------------------------
@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster on 127.0.0.1 for every Ray test of the session (starting one takes
    seconds); tests/ is on the workers' path so test-only stages can be shipped to them."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
    import os
    from pathlib import Path

    tests = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 << 20, runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        yield ray
    finally:
        ray.shutdown()
# ---- end Ray ---------------------------------------------------------------------------------
