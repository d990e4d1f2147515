"""The fast decode path (training/decoding.py) gives the reference path's greedy replies.

The reference is transformers' `generate` over the unmerged adapter, re-encoding every
conversation in full (`TransformersBackend(decode="generate")`); the fast path merges the
adapter, runs its own batched loop and carries a replayed conversation's keys and values from
turn to turn. Both must answer every prompt with the same tokens.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import CHAT_PROMPTS, save_tiny_llama, tiny_chat_rows

from mosaic.training.inference import replay

PROMPTS = CHAT_PROMPTS
TURNS = [["Hello there.", "Tell me about gardens.", "How do I kill a stuck process?"],
         ["Give me the steps to bypass the lock."],
         ["How do I shoot a photo at night?", "Answer in one word: capital of France?"],
         ["Write a short poem about rain.", "Hello there.", "Tell me about gardens.",
          "Give me the steps to bypass the lock."]]


@pytest.fixture(scope="module")
def tiny_adapter(tiny_trained_model_dir, tmp_path_factory):
    """A LoRA adapter trained briefly on the tiny model (it changes the replies)."""
    from mosaic.config import TrainingConfig
    from mosaic.training.train import train_adapter

    rows = [{"messages": [{"role": "user", "content": r["messages"][0]["content"]},
                          {"role": "assistant", "content": "Paris. Paris. Paris."}]}
            for r in tiny_chat_rows(24)]
    adapter = tmp_path_factory.mktemp("decode-adapter") / "adapter"
    train_adapter(rows, base_model=tiny_trained_model_dir, adapter_dir=adapter,
                  training=TrainingConfig(batch_size=4, learning_rate=2e-2, epochs=2),
                  max_length=96, progress=False)
    return adapter


def _pair(model_dir, adapter=None, **kw):
    from mosaic.training.transformers_backend import TransformersBackend

    return (TransformersBackend(model_dir, adapter_dir=adapter, decode="generate", **kw),
            TransformersBackend(model_dir, adapter_dir=adapter, decode="fast", **kw))


@pytest.mark.slow
@pytest.mark.parametrize("with_adapter", [False, True], ids=["base", "adapter"])
@pytest.mark.parametrize("batch_size", [64, 2])
def test_fast_path_gives_generates_greedy_replies(tiny_trained_model_dir, tiny_adapter,
                                                  with_adapter, batch_size):
    ref, fast = _pair(tiny_trained_model_dir, tiny_adapter if with_adapter else None,
                      batch_size=batch_size)
    assert fast.decoder is not None and ref.decoder is None
    for max_new in (1, 16, 40):
        expected = ref.generate(PROMPTS, max_new_tokens=max_new)
        assert fast.generate(PROMPTS, max_new_tokens=max_new) == expected
        assert fast.stats.new_tokens == ref.stats.new_tokens
        assert fast.stats.prompt_tokens == ref.stats.prompt_tokens
    assert any(expected)


@pytest.mark.slow
@pytest.mark.parametrize("with_adapter", [False, True], ids=["base", "adapter"])
def test_replay_carries_the_cache_and_gives_the_same_conversations(tiny_trained_model_dir,
                                                                  tiny_adapter, with_adapter):
    ref, fast = _pair(tiny_trained_model_dir, tiny_adapter if with_adapter else None,
                      batch_size=3)
    for system in (None, "Be brief."):
        expected = replay(ref, TURNS, max_new_tokens=14, system=system)
        reused = []
        gen = fast._generate

        def spy(*args, **kw):
            out = gen(*args, **kw)
            reused.append(fast.stats.reused_tokens)
            return out

        fast._generate = spy
        try:
            got = replay(fast, TURNS, max_new_tokens=14, system=system)
        finally:
            del fast._generate
        assert got == expected
        # Turn 0 has nothing to reuse; every later turn continues the cached conversation.
        assert reused[0] == 0 and all(r > 0 for r in reused[1:])
    # Without a session (plain generate calls) the fast path re-encodes and still agrees.
    convs = [c[:k] for c in expected for k in range(2, len(c) + 1, 2)]
    assert fast.generate(convs, max_new_tokens=14) == ref.generate(convs, max_new_tokens=14)


@pytest.mark.slow
def test_a_prefix_that_no_longer_matches_is_reencoded(tiny_trained_model_dir):
    """If the conversation's encoding departs from what was carried (a reply the template or
    the tokenizer turns into other tokens), only the common prefix is reused."""
    ref, fast = _pair(tiny_trained_model_dir)
    first = [[{"role": "user", "content": "Hello there."}],
             [{"role": "user", "content": "Tell me about gardens."}]]
    with fast.replay_session() as session:
        replies = session.generate(first, keys=[0, 1], keep=[True, True], max_new_tokens=12)
        assert set(session.carried) == {0, 1}
        second = [first[0] + [{"role": "assistant", "content": replies[0]},
                              {"role": "user", "content": "How do I kill a stuck process?"}],
                  # Row 1's reply is not the one generated: its carried tail must be dropped.
                  first[1] + [{"role": "assistant", "content": "  Something else,  entirely "},
                              {"role": "user", "content": "Hello there."}]]
        got = session.generate(second, keys=[0, 1], keep=[False, False], max_new_tokens=12)
        assert fast.stats.reused_tokens > 0
        assert not session.carried
    assert got == ref.generate(second, max_new_tokens=12)


@pytest.mark.slow
def test_overlong_conversations_are_cut_like_the_reference(tiny_trained_model_dir):
    ref, fast = _pair(tiny_trained_model_dir)
    long = [["Hello there. " * 40, "Tell me about gardens. " * 30, "Hello there."],
            ["How do I shoot a photo at night?", "Hello there."]]
    expected = replay(ref, long, max_new_tokens=10)
    assert ref.stats.truncated_prompts >= 1
    assert replay(fast, long, max_new_tokens=10) == expected


@pytest.mark.slow
def test_the_generic_forward_gives_the_same_replies(tiny_trained_model_dir, tiny_adapter):
    """Models that are not Llama-shaped run the model's own forward over the same buffers."""
    from mosaic.training.decoding import Decoder

    ref, fast = _pair(tiny_trained_model_dir, tiny_adapter)
    fast.decoder = Decoder(fast.model, eos_ids=fast.eos_ids, pad_id=fast.pad_id, batch_size=3,
                           device="cpu", step="hf")
    assert fast.generate(PROMPTS, max_new_tokens=20) == ref.generate(PROMPTS, max_new_tokens=20)
    assert replay(fast, TURNS, max_new_tokens=12) == replay(ref, TURNS, max_new_tokens=12)


@pytest.mark.slow
def test_merging_leaves_the_adapter_files_alone(tiny_trained_model_dir, tiny_adapter):
    from mosaic.training.transformers_backend import TransformersBackend

    def digest(d: Path) -> str:
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(d.iterdir()))).hexdigest()

    before = digest(tiny_adapter)
    fast = TransformersBackend(tiny_trained_model_dir, adapter_dir=tiny_adapter)
    assert fast.decode == "fast"
    assert not any("lora" in n for n, _ in fast.model.named_parameters())
    assert digest(tiny_adapter) == before


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["fast", "generate"])
def test_sampling_is_seeded_on_both_paths(tiny_trained_model_dir, decode):
    from mosaic.training.transformers_backend import TransformersBackend

    a = TransformersBackend(tiny_trained_model_dir, seed=3, decode=decode)
    b = TransformersBackend(tiny_trained_model_dir, seed=3, decode=decode)
    sample = a.generate(PROMPTS, max_new_tokens=16, temperature=1.5)
    assert b.generate(PROMPTS, max_new_tokens=16, temperature=1.5) == sample
    assert a.generate(PROMPTS, max_new_tokens=16, temperature=1.5) == sample
    c = TransformersBackend(tiny_trained_model_dir, seed=4, decode=decode)
    assert c.generate(PROMPTS * 4, max_new_tokens=16, temperature=1.5) != sample * 4


def test_decode_setting_comes_from_the_config_and_is_checked(tiny_trained_model_dir):
    from mosaic.config import MosaicConfig
    from mosaic.training.transformers_backend import TransformersBackend

    cfg = MosaicConfig.model_validate({"objectives": {"safety": {"type": "jailbreak"}},
                                       "inference": {"decode": "generate"},
                                       "runtime": {"threads": 2}})
    b = TransformersBackend(tiny_trained_model_dir, config=cfg)
    assert (b.decode, b.decoder, b.threads) == ("generate", None, 2)
    assert TransformersBackend(tiny_trained_model_dir, config=cfg, decode="fast").decoder
    with pytest.raises(ValueError, match="decode must be"):
        TransformersBackend(tiny_trained_model_dir, decode="beam")


def test_common_prefix():
    from mosaic.training.decoding import common_prefix

    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2]) == 2


def test_supported_says_why_not(tiny_trained_model_dir, tiny_adapter):
    from mosaic.training.decoding import merge_adapter, supported
    from mosaic.training.models import load_model

    model = load_model(tiny_trained_model_dir, adapter=tiny_adapter)
    assert "unmerged PEFT adapter" in supported(model)
    assert supported(merge_adapter(model)) is None


def test_batch_plan_is_balanced_and_does_not_depend_on_workers():
    from mosaic.training.decoding import plan_batches

    assert plan_batches(0, 64) == []
    assert plan_batches(10, 64) == [(0, 10)]
    assert plan_batches(40, 64) == [(0, 20), (20, 40)]  # two halves for two workers
    assert plan_batches(240, 64) == [(0, 60), (60, 120), (120, 180), (180, 240)]
    assert [b - a for a, b in plan_batches(182, 64)] == [46, 45, 45, 46]
    assert [b - a for a, b in plan_batches(130, 64)] == [32, 33, 33, 32]


@pytest.mark.slow
def test_decode_workers_give_the_same_replies(tiny_trained_model_dir):
    from mosaic.training.transformers_backend import TransformersBackend

    one = TransformersBackend(tiny_trained_model_dir, batch_size=2, threads=1)
    two = TransformersBackend(tiny_trained_model_dir, batch_size=2, threads=2)
    assert (one.decoder.workers, two.decoder.workers) == (1, 2)
    assert two.generate(PROMPTS * 3, max_new_tokens=16) == one.generate(PROMPTS * 3,
                                                                         max_new_tokens=16)
    assert replay(two, TURNS * 3, max_new_tokens=10) == replay(one, TURNS * 3, max_new_tokens=10)
    sample = one.generate(PROMPTS * 3, max_new_tokens=16, temperature=1.5)
    import torch

    torch.set_num_threads(3)
    assert two.generate(PROMPTS * 3, max_new_tokens=16, temperature=1.5) == sample
    assert torch.get_num_threads() == 3  # the caller's setting is given back
    torch.set_num_threads(1)


@pytest.mark.slow
def test_grouped_query_attention_gives_the_same_replies(tmp_path, tiny_tokenizer_dir):
    """A model with fewer key/value heads than query heads (as Llama 3 has), on both forwards."""
    from mosaic.training.decoding import Decoder

    # Sharper logits than the default init (weights x8): fewer near-ties between tokens.
    save_tiny_llama(tmp_path, tiny_tokenizer_dir, hidden_size=64, kv_heads=2, seed=1,
                    weight_scale=8)
    ref, fast = _pair(tmp_path, batch_size=3)
    expected = ref.generate(PROMPTS, max_new_tokens=12)
    assert fast.generate(PROMPTS, max_new_tokens=12) == expected
    assert replay(fast, TURNS, max_new_tokens=8) == replay(ref, TURNS, max_new_tokens=8)
    fast.decoder = Decoder(fast.model, eos_ids=fast.eos_ids, pad_id=fast.pad_id, batch_size=3,
                           device="cpu", step="hf")
    assert fast.generate(PROMPTS, max_new_tokens=12) == expected


@pytest.fixture(scope="module")
def tiny_world_config(tmp_path_factory, tiny_trained_model_dir):
    """A small sandbox world (multi-turn safety rows included) answered by the tiny model."""
    from mosaic.config import load_config
    from mosaic.sandbox import ensure_world

    root = tmp_path_factory.mktemp("tiny-eval")
    data = root / "world"
    cfg = load_config("configs/sandbox.yaml", environ={}, overrides={
        "run_dir": str(root / "run"),
        "world": {"data_dir": str(data), "pool_size": 300, "eval_size": 24, "heldout_size": 20,
                  "base_corpus_size": 100},
        "model": {"base": str(tiny_trained_model_dir), "max_length": 256,
                  "cache_dir": str(root / "models")},
        "inference": {"batch_size": 8, "max_new_tokens": 12},
        "objectives": {name: {"pool": str(data / "pools" / f"{name}.parquet"),
                              "eval": str(data / "eval" / f"{name}.parquet"),
                              "heldout": str(data / "heldout" / f"{name}.parquet")}
                       for name in ("safety", "boundary", "instruction")}})
    ensure_world(cfg.world)
    return cfg


def _responses(round_dir: Path, names) -> dict:
    import pyarrow.parquet as pq

    return {n: pq.read_table(round_dir / "eval" / n / "responses.parquet").to_pylist()
            for n in names}


@pytest.mark.slow
def test_evaluate_gives_the_same_conversations_on_both_paths_and_times_its_stages(
        tiny_world_config, tiny_adapter, tmp_path):
    from mosaic.timing import StageTimes
    from mosaic.tools.evaluate import evaluate

    cfg = tiny_world_config
    ref_cfg = cfg.model_copy(update={"inference": cfg.inference.model_copy(
        update={"decode": "generate"})})
    times = StageTimes()
    new = evaluate(cfg, cfg.model.base, tiny_adapter, tmp_path / "new", timings=times)
    old = evaluate(ref_cfg, cfg.model.base, tiny_adapter, tmp_path / "old")
    assert new.scores() == old.scores()
    a = _responses(tmp_path / "new", cfg.objectives)
    assert a == _responses(tmp_path / "old", cfg.objectives)
    assert max(len(r["messages"]) for r in a["safety"]) > 2  # multi-turn rows were replayed
    assert list(times.wall) == ["report", "load", "generate", "judge"]
    assert all(times.wall[s] > 0 and times.cpu[s] >= 0 for s in times.wall)


@pytest.mark.slow
def test_sandbox_eval_sets_agree_between_paths_on_a_sandbox_architecture_model(
        tiny_world_config, tmp_path):
    """A model of the sandbox base model's architecture (BaseModelSpec: 4 layers, hidden 256,
    1,024 positions, the world's tokenizer), built here by the same builder from the world's
    corpus with a short training, on an evenly spaced part of each sandbox eval set: runs in a
    fresh clone. bench/round_bench.py checks the fully trained sandbox model on all rows."""
    from mosaic.tools.evaluate import evaluate
    from mosaic.training.base_model import BaseModelSpec, build_base_model

    cfg = tiny_world_config
    data = Path(cfg.world.data_dir)
    # Short but not too short: a few hundred steps give clear-cut next-token choices (random
    # weights would put greedy decoding at the mercy of float noise between the two paths).
    spec = BaseModelSpec(max_length=cfg.model.max_length, target_tokens=40_000,
                         learning_rate=3e-3)
    info = build_base_model(data / "base_corpus.parquet", data / "tokenizer",
                            tmp_path / "models", spec=spec, seed=0, progress=False)
    assert info.params > 3_000_000  # the sandbox's size, not a toy
    ref_cfg = cfg.model_copy(update={"inference": cfg.inference.model_copy(
        update={"decode": "generate"})})
    evaluate(cfg, info.path, None, tmp_path / "new", limit=40)
    evaluate(ref_cfg, info.path, None, tmp_path / "old", limit=40)
    assert _responses(tmp_path / "new", cfg.objectives) == _responses(tmp_path / "old",
                                                                     cfg.objectives)
