"""The base model build is repeatable on one machine: the same inputs give the same weight bytes
whatever the caller's thread count and random state, and the BPE tokenizer trains to the same
bytes (training/base_model.py, "Reproducibility")."""

from __future__ import annotations

import hashlib
from pathlib import Path

from conftest import TINY_CHATS, tiny_chat_rows

TINY_SPEC = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                 max_position_embeddings=256, batch_size=8, max_length=64, target_tokens=4_000,
                 learning_rate=1e-2)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_clean_builds_give_identical_weights(tiny_tokenizer_dir, tmp_path):
    import torch

    from mosaic.training.base_model import BUILD_THREADS, BaseModelSpec, build_base_model

    spec = BaseModelSpec(**TINY_SPEC)
    rows = tiny_chat_rows(24)
    first = build_base_model(rows, tiny_tokenizer_dir, tmp_path / "a", spec=spec, seed=0,
                             progress=False)
    # The second build starts from another thread count and random state than the first: the
    # build pins its threads and seeds a forked generator, and leaves the caller's as they were.
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS + 1)
    torch.manual_seed(123)
    torch.rand(7)
    state = torch.random.get_rng_state()
    try:
        second = build_base_model(rows, tiny_tokenizer_dir, tmp_path / "b", spec=spec, seed=0,
                                  progress=False)
        assert torch.get_num_threads() == BUILD_THREADS + 1
        assert torch.equal(torch.random.get_rng_state(), state)
    finally:
        torch.set_num_threads(threads)

    assert not first.cached and not second.cached
    assert _sha256(first.path / "model.safetensors") == _sha256(second.path / "model.safetensors")
    assert first.loss_curve == second.loss_curve
    machine = second.machine
    assert machine["threads"] == BUILD_THREADS and machine["torch_cpu_capability"]
    assert machine["torch"] == torch.__version__


def test_tokenizer_training_is_repeatable(tmp_path):
    from mosaic.training.tokenizer import build_tokenizer

    # Few distinct sentences: many pairs tie on frequency, so tie-breaking decides the merges.
    texts = [c for chat in TINY_CHATS for _, c in chat] * 20
    for name in ("a", "b"):
        build_tokenizer(texts, vocab_size=320).save_pretrained(tmp_path / name)
    assert _sha256(tmp_path / "a" / "tokenizer.json") == _sha256(tmp_path / "b" / "tokenizer.json")
