"""LoRA SFT/DPO training, trl settings, training-file validation and the base-model builder."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_chat_rows

from mosaic.config import TrainingConfig
from mosaic.training.train import (
    TrainingDataError,
    build_trainer,
    load_prepared,
    prepare_sft_rows,
    read_rows,
    remove_stale_staging,
    train_adapter,
)

FAST = TrainingConfig(batch_size=4, learning_rate=1e-2, lora_r=4, lora_alpha=8)


def _lora_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


def test_settings_map_training_config_onto_trl_and_peft(tmp_path):
    from mosaic.training.settings import trainer_settings

    cfg = TrainingConfig(lora_r=8, lora_alpha=24, lora_dropout=0.1, learning_rate=3e-4,
                         batch_size=8, epochs=2, seed=7, dpo_beta=0.3)
    args, lora = trainer_settings(cfg, method="sft", output_dir=str(tmp_path), max_length=128,
                                  device="cpu", n_rows=100, n_params=3_000_000, progress=False)
    assert (args.learning_rate, args.per_device_train_batch_size, args.num_train_epochs) == (3e-4, 8, 2)
    assert args.seed == 7 and args.max_length == 128
    assert args.assistant_only_loss and not args.packing and not args.padding_free
    assert not args.gradient_checkpointing  # small model: recomputation only costs time
    assert not args.bf16 and args.use_cpu
    assert args.train_sampling_strategy == "group_by_length"
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (8, 24, 0.1)
    assert lora.target_modules == "all-linear" or "all-linear" in lora.target_modules

    big, _ = trainer_settings(cfg, method="sft", output_dir=str(tmp_path), max_length=128,
                              device="cpu", n_rows=100, n_params=8_000_000_000, progress=False)
    assert big.gradient_checkpointing

    dpo, _ = trainer_settings(cfg, method="dpo", output_dir=str(tmp_path), max_length=128,
                              device="cpu", n_rows=100, n_params=3_000_000, progress=False)
    assert dpo.beta == 0.3 and not dpo.gradient_checkpointing and dpo.max_length == 128

    with pytest.raises(ValueError, match="unknown training method"):
        trainer_settings(cfg, method="ppo", output_dir=str(tmp_path), max_length=128,
                         device="cpu", n_rows=1, n_params=1)


# --------------------------------------------------------------------------------------------
# Training-file validation
# --------------------------------------------------------------------------------------------


def test_bad_rows_are_skipped_with_counts(tiny_model_dir, tmp_path):
    rows = tiny_chat_rows(12) + [
        {"messages": []},
        {"messages": None},
        {"messages": [{"role": "user", "content": "anyone there?"}]},
        {"messages": [{"role": "user", "content": "word " * 400},
                      {"role": "assistant", "content": "ok"}]},
    ]
    result = train_adapter(rows, base_model=tiny_model_dir, adapter_dir=tmp_path / "a",
                           training=FAST, max_length=96, progress=False)
    assert result.skipped == {"empty_messages": 2, "no_assistant_turn": 1, "too_long": 1}
    assert result.train_rows == 12
    assert result.steps == 3


@pytest.mark.parametrize("row, message", [
    ({"text": "hi"}, r"row 0: missing column 'messages'"),
    ({"messages": "hello"}, r"row 0 field 'messages': expected a list"),
    ({"messages": [{"role": "bot", "content": "x"}]},
     r"row 0 field 'messages': message 0 has unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": 3}]},
     r"row 0 field 'messages': message 0 content must be a string"),
])
def test_malformed_rows_are_errors_naming_row_and_field(tiny_model_dir, row, message):
    from mosaic.training.models import load_tokenizer

    with pytest.raises(TrainingDataError, match=message):
        load_prepared([row], load_tokenizer(tiny_model_dir), 96, "sft")


def test_malformed_files_name_the_file_and_line(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{not json\n')
    with pytest.raises(TrainingDataError, match=r"bad.jsonl, row 1 \(line 2\): not valid JSON"):
        read_rows(bad)
    with pytest.raises(TrainingDataError, match="training file not found"):
        read_rows(tmp_path / "missing.parquet")
    with pytest.raises(TrainingDataError, match="unsupported file type '.csv'"):
        read_rows(_touch(tmp_path / "x.csv"))
    only_bad = tmp_path / "empty.jsonl"
    only_bad.write_text('{"messages": []}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(TrainingDataError, match=r"empty.jsonl: no trainable rows .*empty_messages"):
        train_adapter(only_bad, base_model=tiny_model_dir, adapter_dir=tmp_path / "a",
                      training=FAST, max_length=96, progress=False)
    assert not (tmp_path / "a").exists()


def _touch(p: Path) -> Path:
    p.write_text("")
    return p


def test_parquet_training_file_is_read(tmp_path, tiny_model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(tiny_chat_rows(8)), path)
    from mosaic.training.models import load_tokenizer

    prepared = load_prepared(path, load_tokenizer(tiny_model_dir), 96, "sft")
    assert len(prepared.rows) == 8 and prepared.tokens == sum(prepared.lengths) > 0


# --------------------------------------------------------------------------------------------
# SFT
# --------------------------------------------------------------------------------------------


def test_sft_loss_mask_covers_assistant_tokens_only(tiny_model_dir, tmp_path):
    """The collated batch trl trains on has labels only on assistant content and its end token."""
    from mosaic.training.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    rows = [{"messages": [{"role": "system", "content": "Be brief."}] + r["messages"]}
            for r in tiny_chat_rows(6)]
    prepared = load_prepared(rows, tok, 128, "sft")
    trainer = build_trainer(prepared, base_model=tiny_model_dir, tokenizer=tok, training=FAST,
                            max_length=128, method="sft", output_dir=tmp_path, progress=False)
    rendered = {tok.apply_chat_template(r["messages"], tokenize=False): r["messages"] for r in rows}
    seen = 0
    for batch in trainer.get_train_dataloader():
        for ids, labels, attn in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            ids, labels, attn = ids.tolist(), labels.tolist(), attn.tolist()
            n = sum(attn)
            assert all(lab == -100 for lab in labels[n:])  # padding
            text = tok.decode(ids[:n])
            msgs = rendered[text]
            trained = [t for t, lab in zip(ids, labels) if lab != -100]
            assert all(lab == t for t, lab in zip(ids, labels) if lab != -100)
            expected = "".join(m["content"] + "<|end|>" for m in msgs if m["role"] == "assistant")
            assert tok.decode(trained) == expected
            seen += 1
    assert seen == len(rows)


def test_lora_sft_changes_adapter_weights_and_leaves_base_unchanged(tiny_model_dir, tmp_path):
    import torch

    from mosaic.training.models import load_model, load_tokenizer

    base = {k: v.clone() for k, v in load_model(tiny_model_dir).state_dict().items()}
    tok = load_tokenizer(tiny_model_dir)
    prepared = load_prepared(tiny_chat_rows(16), tok, 96, "sft")
    trainer = build_trainer(prepared, base_model=tiny_model_dir, tokenizer=tok, training=FAST,
                            max_length=96, method="sft", output_dir=tmp_path, progress=False)
    trainer.train()
    lora_b = {n: p for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b.values())  # B starts at zero
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for name, tensor in trainer.model.get_base_model().state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(tensor, base[key]), f"base weight {key} changed"


def test_adapters_save_in_peft_format_reload_and_change_outputs(tiny_trained_model_dir, tmp_path):
    from mosaic.training.transformers_backend import TransformersBackend

    rows = [{"messages": [{"role": "user", "content": r["messages"][0]["content"]},
                          {"role": "assistant", "content": "Paris. Paris. Paris."}]}
            for r in tiny_chat_rows(24)]
    adapter = tmp_path / "round-1" / "adapter"
    result = train_adapter(rows, base_model=tiny_trained_model_dir, adapter_dir=adapter,
                           training=TrainingConfig(batch_size=4, learning_rate=2e-2, epochs=3),
                           max_length=96, progress=False)
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "train_result.json"} <= names
    assert not any(n.startswith(".") for n in os.listdir(adapter.parent))  # no leftovers
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16
    assert all("lora_" in k for k in _lora_tensors(adapter))
    saved = json.loads((adapter / "train_result.json").read_text())
    assert saved["steps"] == result.steps == 18 and saved["train_rows"] == 24
    assert result.final_loss is not None and math.isfinite(result.final_loss)

    prompts = [[{"role": "user", "content": "Hello there."}],
               [{"role": "user", "content": "How do I shoot a photo at night?"}]]
    base_out = TransformersBackend(tiny_trained_model_dir).generate(prompts, max_new_tokens=12)
    tuned = TransformersBackend(tiny_trained_model_dir, adapter_dir=adapter)
    tuned_out = tuned.generate(prompts, max_new_tokens=12)
    assert tuned_out != base_out
    again = TransformersBackend(tiny_trained_model_dir, adapter_dir=adapter)
    assert again.generate(prompts, max_new_tokens=12) == tuned_out
    # The adapter moved the model toward its training answer.
    target = rows[0]["messages"]
    base = TransformersBackend(tiny_trained_model_dir)
    assert _sft_loss(tuned, target) < _sft_loss(base, target) - 0.5


def _sft_loss(backend, messages) -> float:
    import torch

    enc = backend.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
    ids = torch.tensor([enc["input_ids"]])
    labels = torch.tensor([[t if m else -100
                            for t, m in zip(enc["input_ids"], enc["assistant_masks"])]])
    with torch.no_grad():
        return backend.model(input_ids=ids, labels=labels).loss.item()


def test_training_is_seeded(tiny_model_dir, tmp_path):
    import torch

    runs = []
    for name in ("a", "b"):
        train_adapter(tiny_chat_rows(8), base_model=tiny_model_dir, adapter_dir=tmp_path / name,
                      training=FAST, max_length=96, progress=False)
        runs.append(_lora_tensors(tmp_path / name))
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_retraining_replaces_an_adapter_atomically(tiny_model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    first = train_adapter(tiny_chat_rows(8), base_model=tiny_model_dir, adapter_dir=adapter,
                          training=FAST, max_length=96, progress=False)
    second = train_adapter(tiny_chat_rows(12), base_model=tiny_model_dir, adapter_dir=adapter,
                           training=FAST, max_length=96, progress=False)
    assert (first.train_rows, second.train_rows) == (8, 12)
    assert json.loads((adapter / "train_result.json").read_text())["train_rows"] == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_a_training_process_killed_mid_run_leaves_no_staging_folder_for_long(tiny_model_dir,
                                                                              tmp_path):
    """SIGKILL skips train_adapter's cleanup: its staging folder stays until the next
    train_adapter call on the same adapter, which removes it (and only it)."""
    adapter = tmp_path / "adapter"
    killed = (
        "import os, signal, sys\n"
        "import mosaic.training.train as t\n"
        "from mosaic.config import TrainingConfig\n"
        "from conftest import tiny_chat_rows\n"
        "t.build_trainer = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"t.train_adapter(tiny_chat_rows(4), base_model={str(tiny_model_dir)!r},\n"
        f"                adapter_dir={str(adapter)!r}, training=TrainingConfig(), max_length=96)\n")
    proc = subprocess.run([sys.executable, "-c", killed], cwd=Path(__file__).parent,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    (stale,) = tmp_path.glob(".adapter.train-*")
    # Folders this call must leave alone: another live process training the same adapter, and
    # a dead process's folder of a different adapter.
    live = tmp_path / f".adapter.train-{os.getppid()}-abcd1234"
    other = tmp_path / f".adapter2.train-{_dead_pid()}-abcd1234"
    for d in (live, other):
        d.mkdir()
    result = train_adapter(tiny_chat_rows(8), base_model=tiny_model_dir, adapter_dir=adapter,
                           training=FAST, max_length=96, progress=False)
    assert result.train_rows == 8 and (adapter / "train_result.json").is_file()
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["adapter", live.name, other.name])


def test_remove_stale_staging_matches_only_its_adapter(tmp_path):
    dead = _dead_pid()
    names = {
        f".adapter.train-{dead}-k3j_x9q2": True,  # its process is gone
        f".adapter.train-{os.getpid()}-k3j_x9q2": False,  # this process (another thread)
        ".adapter.train-k3j_x9q2": True,  # staged before pids were recorded
        ".adapter.old-0123abcd": True,  # publish_dir died between its two renames
        f".adapter.v2.train-{dead}-k3j_x9q2": False,  # the adapter "adapter.v2"
        f".adapter.train-{dead}-k3j_x9q2.keep": False,  # not a name train_adapter makes
        "adapter.train-k3j_x9q2": False,  # not hidden: not ours
    }
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / f".adapter.train-{dead}-filefile").write_text("a file, not a staging folder")
    removed = remove_stale_staging(tmp_path / "adapter")
    assert sorted(p.name for p in removed) == sorted(n for n, gone in names.items() if gone)
    for name, gone in names.items():
        assert (tmp_path / name).exists() != gone, name
    assert remove_stale_staging(tmp_path / "missing" / "adapter") == []


# --------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------


def _dpo_rows(n: int) -> list[dict]:
    rows = []
    for r in tiny_chat_rows(n):
        m = r["messages"]
        refusal = {"role": "assistant", "content": "I can't help with that."}
        rows.append({"prompt": [m[0]], "chosen": [refusal], "rejected": [m[1]]})
    return rows


def test_dpo_runs_a_few_steps_on_a_tiny_model(tiny_model_dir, tmp_path):
    rows = [r for r in _dpo_rows(16) if r["chosen"] != r["rejected"]]
    rows.append({"prompt": [], "chosen": rows[0]["chosen"], "rejected": rows[0]["rejected"]})
    rows.append({"prompt": rows[0]["prompt"], "chosen": rows[0]["chosen"],
                 "rejected": rows[0]["chosen"]})
    result = train_adapter(rows, base_model=tiny_model_dir, adapter_dir=tmp_path / "dpo",
                           training=FAST, max_length=96, method="dpo", progress=False)
    assert result.method == "dpo" and result.steps == math.ceil(len(rows[:-2]) / 4)
    assert result.skipped == {"empty_prompt": 1, "chosen_equals_rejected": 1}
    assert result.final_loss is not None and math.isfinite(result.final_loss)
    lora_b = [v for k, v in _lora_tensors(tmp_path / "dpo").items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)


def test_dpo_rows_are_validated(tiny_model_dir):
    from mosaic.training.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    with pytest.raises(TrainingDataError, match="row 0: missing column 'rejected'"):
        load_prepared([{"prompt": [], "chosen": []}], tok, 96, "dpo")
    good = _dpo_rows(2)[0]
    rows = [good,
            {**good, "prompt": good["prompt"] + good["chosen"]},  # ends with the assistant
            {**good, "chosen": [{"role": "user", "content": "x"}]},
            {**good, "rejected": []},
            {**good, "rejected": [{"role": "assistant", "content": "long " * 300}]}]
    prepared = load_prepared(rows, tok, 96, "dpo")
    assert len(prepared.rows) == 1
    assert prepared.skipped == {"prompt_not_ending_with_user": 1, "non_assistant_answer": 1,
                                "empty_chosen_or_rejected": 1, "too_long": 1}


def test_sft_template_without_generation_markers_is_a_clear_error(tiny_model_dir):
    from mosaic.training.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    tok.chat_template = tok.chat_template.replace("{% generation %}", "").replace(
        "{% endgeneration %}", "")
    with pytest.raises(TrainingDataError, match="generation"):
        prepare_sft_rows(tiny_chat_rows(2), tok, 96)


# --------------------------------------------------------------------------------------------
# Base-model builder
# --------------------------------------------------------------------------------------------

TINY_SPEC = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                 max_position_embeddings=256, batch_size=8, max_length=64, target_tokens=6_000,
                 learning_rate=1e-2)


def test_base_model_builds_once_learns_and_reloads_offline(tiny_tokenizer_dir, tmp_path):
    from mosaic.training.base_model import INFO_FILE, BaseModelSpec, build_base_model

    spec = BaseModelSpec(**TINY_SPEC)
    rows = tiny_chat_rows(24) + [{"messages": []}]
    info = build_base_model(rows, tiny_tokenizer_dir, tmp_path, spec=spec, seed=0, progress=False)
    assert not info.cached and info.path.parent == tmp_path
    assert info.skipped == {"empty_messages": 1} and info.rows == 24
    assert info.train_tokens >= spec.target_tokens
    first, last = info.loss_curve[0][2], info.loss_curve[-1][2]
    assert last < first - 1.0, info.loss_curve
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert left == [info.path.name]  # no temp dirs left
    assert (info.path / INFO_FILE).is_file()

    again = build_base_model(rows, tiny_tokenizer_dir, tmp_path, spec=spec, seed=0, progress=False)
    assert again.cached and again.path == info.path and again.final_loss == info.final_loss
    other = build_base_model(rows, tiny_tokenizer_dir, tmp_path, spec=spec, seed=1, progress=False)
    assert other.path != info.path

    code = (
        "import sys; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "p = sys.argv[1]; m = AutoModelForCausalLM.from_pretrained(p)\n"
        "t = AutoTokenizer.from_pretrained(p)\n"
        "t.apply_chat_template([{'role': 'user', 'content': 'Hi.'}], add_generation_prompt=True)\n"
        "print(m.config.tie_word_embeddings, t.eos_token, t.padding_side, bool(t.chat_template))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(info.path)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "<|end|>", "left", "True"]


def test_concurrent_builders_train_once(tiny_tokenizer_dir, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from mosaic.training.base_model import BaseModelSpec, build_base_model

    spec = BaseModelSpec(**{**TINY_SPEC, "target_tokens": 2_000})
    with ThreadPoolExecutor(2) as pool:
        infos = list(pool.map(lambda _: build_base_model(tiny_chat_rows(8), tiny_tokenizer_dir,
                                                         tmp_path, spec=spec, progress=False),
                              range(2)))
    assert infos[0].path == infos[1].path
    assert sorted(i.cached for i in infos) == [False, True]


def test_base_model_cache_key_covers_everything_that_determines_it():
    from mosaic.training.base_model import BaseModelSpec, cache_key

    spec = BaseModelSpec()
    key = cache_key(spec, "corpus", "tok", 0)
    assert key == cache_key(BaseModelSpec(), "corpus", "tok", 0)
    assert len({key, cache_key(spec, "corpus2", "tok", 0), cache_key(spec, "corpus", "tok2", 0),
                cache_key(spec, "corpus", "tok", 1),
                cache_key(BaseModelSpec(hidden_size=128), "corpus", "tok", 0)}) == 5


def test_ensure_base_model_errors_name_what_is_missing(tmp_path):
    from mosaic.config import MosaicConfig
    from mosaic.sandbox.base_model import ensure_base_model
    from mosaic.training.base_model import BaseModelError
    from mosaic.training.models import ModelLoadError

    objectives = {"safety": {"type": "jailbreak"}}
    cfg = MosaicConfig.model_validate({"objectives": objectives, "world": {"kind": "files"}})
    with pytest.raises(BaseModelError, match="world.kind is 'files'"):
        ensure_base_model(cfg)
    cfg = MosaicConfig.model_validate({"objectives": objectives,
                                       "model": {"base": str(tmp_path / "nope")}})
    with pytest.raises(ModelLoadError, match="model directory not found"):
        ensure_base_model(cfg)
    (tmp_path / "empty").mkdir()
    cfg = MosaicConfig.model_validate({"objectives": objectives,
                                       "model": {"base": str(tmp_path / "empty")}})
    with pytest.raises(ModelLoadError, match="no config.json"):
        ensure_base_model(cfg)


def test_ensure_base_model_passes_a_local_model_through(tiny_model_dir):
    from mosaic.config import MosaicConfig
    from mosaic.sandbox.base_model import ensure_base_model

    cfg = MosaicConfig.model_validate({"objectives": {"safety": {"type": "jailbreak"}},
                                       "model": {"base": str(tiny_model_dir)}})
    assert ensure_base_model(cfg) == Path(tiny_model_dir)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_sft_trains_on_cuda(tiny_model_dir, tmp_path):
    result = train_adapter(tiny_chat_rows(8), base_model=tiny_model_dir, adapter_dir=tmp_path / "a",
                           training=FAST, max_length=96, device="cuda", progress=False)
    assert result.steps == 2 and (tmp_path / "a" / "adapter_model.safetensors").is_file()
