"""The base model build is repeatable: the same inputs give the same weight bytes whatever the
caller's thread count, random state and CPU kernel settings (the build pins its kernels in a
process of its own), and the BPE tokenizer trains to the same bytes (training/base_model.py,
"Reproducibility")."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
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


# What a clean build on another machine would do, from a fresh process each: the build script
# prints the weights' sha256 and the kernel set the build recorded.
_BUILD = """
import hashlib, json, sys
sys.path.insert(0, {tests!r})
from conftest import tiny_chat_rows
from mosaic.training.base_model import BaseModelSpec, build_base_model
info = build_base_model(tiny_chat_rows(24), {tok!r}, {cache!r}, spec=BaseModelSpec(**{spec!r}),
                        seed=0, progress=False)
print(json.dumps({{"sha": hashlib.sha256((info.path / "model.safetensors").read_bytes())
                   .hexdigest(), "cached": info.cached, "machine": info.machine}}))
"""
# The same training, unpinned (in the calling process, as builds were before version 3).
_UNPINNED = """
import hashlib, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from conftest import tiny_chat_rows
from mosaic.training import base_model as bm
rows = tiny_chat_rows(24)
convs = bm._conversations(rows, "rows")
with bm._pinned():
    bm._train(convs, Path({tok!r}), Path({cache!r}), spec=bm.BaseModelSpec(**{spec!r}), seed=0,
              key="unpinned", progress=False, source="rows", hashes={{}})
print(hashlib.sha256((Path({cache!r}) / "model.safetensors").read_bytes()).hexdigest())
"""


def _run(script: str, env: dict[str, str], **fmt) -> str:
    import os
    import subprocess
    import sys

    tests = str(Path(__file__).resolve().parent)
    base = {k: v for k, v in os.environ.items() if k not in
            ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")}
    proc = subprocess.run([sys.executable, "-c", script.format(tests=tests, spec=TINY_SPEC, **fmt)],
                          env={**base, **env}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_builds_under_different_cpu_kernel_settings_give_identical_weights(tiny_tokenizer_dir,
                                                                           tmp_path):
    """Two clean builds started under the kernel settings of two machine kinds (torch's AVX512
    or the CPU's best kernels and MKL's AVX512 code path, against AVX2 for both) give the same
    weight bytes: the build process pins its kernels (reproducible_env()). Unpinned, the same
    training gives other bytes under those settings wherever the CPU has AVX512, so the
    comparison is not vacuous there."""
    import json

    import torch

    machines = {"best": {"MKL_ENABLE_INSTRUCTIONS": "AVX512"},
                "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}
    built = {name: json.loads(_run(_BUILD, env, tok=str(tiny_tokenizer_dir),
                                   cache=str(tmp_path / name)))
             for name, env in machines.items()}
    assert not any(b["cached"] for b in built.values())
    assert built["best"]["sha"] == built["avx2"]["sha"]
    from mosaic.training.base_model import kernel_set, reproducible_env

    for b in built.values():
        assert b["machine"]["torch_cpu_capability"] == {"avx2": "AVX2",
                                                        "baseline": "DEFAULT"}[kernel_set()]
        assert b["machine"]["env"]["MKL_CBWR"] == reproducible_env()["MKL_CBWR"]
        assert b["machine"]["threads"] == 1

    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        unpinned = {name: _run(_UNPINNED, env, tok=str(tiny_tokenizer_dir),
                               cache=str(tmp_path / f"unpinned-{name}"))
                    for name, env in machines.items()}
        assert unpinned["best"] != unpinned["avx2"]
