"""The evaluate tool: model (+ adapter) -> responses -> judge -> L3 -> L2 -> L1 -> failure reports.

A plain function over typed inputs and outputs, usable without LangGraph. Everything it
produces lands in the round folder, written atomically:

    <round_dir>/<split>/<objective>/responses.parquet   conversations as generated (replayed)
    <round_dir>/<split>/<objective>/samples.parquet     L3 atoms, L2 and L1 per sample
    <round_dir>/<split>/<objective>/report.json         the objective's FailureReport
    <round_dir>/<split>/eval_report.json                the EvalReport over all objectives

A finished stage leaves a marker (`*.done.json`) holding the hash of everything its output
depends on: responses on (model, adapter, eval file content, generation settings), judged
samples on (judge, responses file). A rerun with the same inputs loads the outputs instead of
generating or judging again, so a resumed run neither regenerates nor re-judges, and the
backend (which loads model weights) is only built when something must be generated.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mosaic.config import ConfigError, MosaicConfig
from mosaic.eval.base import get_objective_type
from mosaic.eval import build_judge
from mosaic.eval.judge import Judge, JudgeError, check_judge_range
from mosaic import stage_cache
from mosaic.io import atomic_write_json, atomic_write_with
from mosaic.markers import check_marker, dir_fingerprint, file_sha256, hash_obj, write_marker
from mosaic.schemas import L1, EvalReport, FailureReport, Message, SampleRecord
from mosaic.timing import StageTimes, stage_timer
from mosaic.training.inference import InferenceBackend, replay

log = logging.getLogger("mosaic.tools.evaluate")

Split = Literal["eval", "heldout"]


@dataclass
class JudgedSample:
    """One evaluated sample after judging: its atoms, L2 and L1, or why the judge gave none."""

    id: str
    l3_prompt: dict[str, Any]
    l3_response: dict[str, Any] | None
    l3_response_turns: list[dict[str, Any]] | None  # earlier assistant turns (multi-turn)
    l2: dict[str, Any] | None
    l1: L1 | None
    judge_error: str | None


# ---- eval sets --------------------------------------------------------------------------------


def load_eval_rows(path: str | Path, objective: str, type_name: str | None = None) -> list[dict[str, Any]]:
    """Rows of an eval or held-out set, validated by `mosaic.data.load_eval_set` (which names
    file, row and field on bad input): id, optional leading system prompt, user turns, atoms."""
    from mosaic.data import DataFormatError, json_column, load_eval_set

    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, f"the eval set of objective {objective!r} does not exist "
                                    f"(build the sandbox world first, or fix objectives.{objective})")
    df = load_eval_set(path, type_name, objective)
    prompts, metas = json_column(df, "l3_prompt"), json_column(df, "metadata")
    rows = []
    for i, (rid, messages) in enumerate(zip(df["id"].tolist(), df["messages"].tolist())):
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        turns = messages[1:] if system is not None else messages
        if any(m["role"] != "user" for m in turns):
            raise DataFormatError(path, "only a leading system message may precede the user turns",
                                  row=i, field="messages")
        rows.append({"id": str(rid), "system": system, "turns": [m["content"] for m in turns],
                     "l3_prompt": prompts[i] or {}, "metadata": metas[i] or {}})
    return rows


def replay_rows(backend: InferenceBackend, rows: Sequence[Mapping[str, Any]], *, max_new_tokens: int,
                temperature: float) -> list[list[dict[str, str]]]:
    """`replay` over eval rows, one batched replay per distinct system prompt, in row order."""
    groups: dict[str | None, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["system"], []).append(i)
    out: list[list[dict[str, str]]] = [[] for _ in rows]
    for system, idx in groups.items():
        convs = replay(backend, [rows[i]["turns"] for i in idx], max_new_tokens=max_new_tokens,
                       temperature=temperature, system=system)
        for i, conv in zip(idx, convs):
            out[i] = conv
    return out


class ReplayStage:
    """Eval generation as a batch stage (`mosaic.engine`): one backend per worker, built from the
    config, replaying the rows it is given (`replay_rows`, the local path's own function)."""

    def __init__(self, config: dict[str, Any], model_dir: str | None, adapter_dir: str | None,
                 threads: int | None = None) -> None:
        cfg = MosaicConfig.model_validate(config)
        if threads is not None and cfg.runtime.threads is None:
            # A worker keeps to the CPUs Ray gave it (the thread policy would take every core).
            cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(
                update={"threads": threads})})
        self.max_new_tokens = cfg.inference.max_new_tokens
        self.temperature = cfg.inference.temperature
        self.backend = build_backend(cfg, model_dir, adapter_dir)

    def __call__(self, rows: list[dict[str, Any]]) -> list[list[dict[str, str]]]:
        return replay_rows(self.backend, rows, max_new_tokens=self.max_new_tokens,
                           temperature=self.temperature)


def generate_on_engine(config: MosaicConfig, model_dir: Path | None, adapter_dir: Path | None,
                       rows: Sequence[Mapping[str, Any]], *, what: str = "generate"
                       ) -> list[list[dict[str, str]]]:
    """`replay_rows` over the rows on the configured engine (`runtime.engine`), each worker
    holding its own backend; the same conversations as the local path, in row order."""
    from mosaic.engine import map_rows

    ray_cfg = config.runtime.ray
    kwargs = {"config": config.model_dump(mode="json"),
              "model_dir": str(model_dir) if model_dir is not None else None,
              "adapter_dir": str(adapter_dir) if adapter_dir is not None else None,
              "threads": max(1, int(ray_cfg.cpus_per_worker))}
    return map_rows(ReplayStage, [{"id": r["id"], "system": r["system"], "turns": list(r["turns"])}
                                  for r in rows],
                    kwargs=kwargs, runtime=config.runtime,
                    batch_rows=ray_cfg.batch_rows or config.inference.batch_size,
                    what=f"{what}: generation")


# ---- backends and judges -------------------------------------------------------------------


def resolve_model_dir(config: MosaicConfig, model_dir: str | Path | None) -> Path | None:
    """The model to evaluate: the given directory, else config.model.base (the sandbox base
    model is built once and cached, a GGUF file converted once). None for an endpoint backend,
    which names its own model."""
    if config.inference.backend == "openai":
        if model_dir is not None:
            raise ConfigError(f"inference.backend 'openai' answers with the served model "
                              f"inference.endpoint.model; a model directory ({model_dir}) cannot "
                              f"be used with it. Drop --model or use the transformers backend")
        return None
    if model_dir is not None:
        return Path(model_dir)
    from mosaic.sandbox.base_model import ensure_base_model

    return Path(ensure_base_model(config))


def build_backend(config: MosaicConfig, model_dir: str | Path | None,
                  adapter_dir: str | Path | None) -> InferenceBackend:
    """The configured inference backend (transformers, openai or vllm) for model (+ adapter)."""
    inf = config.inference
    if inf.backend == "openai":
        from mosaic.training.openai_backend import OpenAIBackend

        if adapter_dir is not None:
            raise ConfigError("inference.backend 'openai' talks to a served model and cannot load "
                              f"the adapter {adapter_dir}; serve it under its own name (e.g. vLLM "
                              "--lora-modules) and set inference.endpoint.model, or use the "
                              "transformers/vllm backend")
        assert inf.endpoint is not None  # the config validator guarantees it
        return OpenAIBackend(inf.endpoint)
    if model_dir is None:
        raise ConfigError(f"inference.backend {inf.backend!r} needs a model directory")
    if inf.backend == "vllm":
        from mosaic.training.vllm_backend import VLLMBackend

        return VLLMBackend(model_dir, adapter_dir=adapter_dir, config=config)
    from mosaic.training.transformers_backend import TransformersBackend

    return TransformersBackend(model_dir, adapter_dir=adapter_dir, config=config)


def _backend_identity(backend: InferenceBackend | None, config: MosaicConfig) -> dict[str, Any]:
    if backend is not None:
        ident = getattr(backend, "identity", None)
        return ident() if callable(ident) else {"backend": backend.name}
    if config.inference.backend == "openai":
        ep = config.inference.endpoint
        assert ep is not None
        return {"backend": "openai", "base_url": ep.base_url, "model": ep.model}
    # The seed only matters when sampling (temperature > 0); dtype is in model_settings.
    return {"backend": config.inference.backend, "seed": config.seed}


# ---- the tool -----------------------------------------------------------------------------


def report_path(round_dir: str | Path, split: Split = "eval") -> Path:
    return Path(round_dir) / split / "eval_report.json"


def evaluate(config: MosaicConfig, model_dir: str | Path | None, adapter_dir: str | Path | None,
             round_dir: str | Path, split: Split = "eval", backend: InferenceBackend | None = None,
             judge: Judge | None = None, *, round: int = 0, limit: int | None = None,
             objectives: Sequence[str] | None = None,
             progress: Callable[[str], None] | None = None,
             timings: StageTimes | None = None) -> EvalReport:
    """Evaluate model (+ adapter) on every objective's eval (or held-out) set; see the module doc.

    `backend` / `judge` default to the ones the config names (built lazily: the backend only if
    some responses are not cached). `limit` keeps N evenly spaced rows of each set. `timings`
    accumulates wall/CPU seconds per stage: load (building the backend: weights, adapter
    merge), generate, judge, report (eval rows, records, reports and their files).
    """
    timed = stage_timer(timings)
    if split not in ("eval", "heldout"):
        raise ValueError(f"split must be 'eval' or 'heldout', got {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of rows, got {limit}")
    say = progress or (lambda msg: log.info("%s", msg))
    names = list(objectives) if objectives is not None else list(config.objectives)
    unknown = [n for n in names if n not in config.objectives]
    if unknown:
        raise ConfigError(f"unknown objective(s) {unknown}; the config has {sorted(config.objectives)}")
    adapter = Path(adapter_dir) if adapter_dir is not None else None
    if adapter is not None and not adapter.exists():
        raise FileNotFoundError(f"adapter directory not found: {adapter}")
    if backend is None:
        model = resolve_model_dir(config, model_dir)
    else:  # a caller-built backend: the model directory only identifies it in the cache keys
        model = Path(model_dir) if model_dir is not None else None
    if model is not None and not model.exists():
        raise FileNotFoundError(f"model directory not found: {model}")

    gen = {"max_new_tokens": config.inference.max_new_tokens,
           "temperature": config.inference.temperature}
    # dtype changes what a local model generates; max_length bounds the prompt it sees.
    model_settings = {"dtype": config.model.dtype, "max_length": config.model.max_length}
    model_key = {"backend": _backend_identity(backend, config), "model": dir_fingerprint(model),
                 "adapter": dir_fingerprint(adapter), "generation": gen,
                 "model_settings": model_settings if model is not None else None}
    built: dict[str, Any] = {"backend": backend, "judge": judge}

    def get_backend() -> InferenceBackend:
        if built["backend"] is None:
            say(f"loading {config.inference.backend} backend for {model or 'endpoint'}"
                + (f" + adapter {adapter}" if adapter else ""))
            with timed("load"):
                built["backend"] = build_backend(config, model, adapter)
        return built["backend"]

    def get_judge() -> Judge:
        if built["judge"] is None:
            built["judge"] = build_judge(config)
        return built["judge"]

    # Before anything is generated: a judge measured on the sandbox's text only refuses other
    # text unless the config allows it (then it says so once).
    files = [getattr(config.objectives[n], split) for n in names]
    for warning in check_judge_range(get_judge(), [f for f in files if f],
                                     allow=config.judge.allow_out_of_range):
        log.warning("%s", warning)
        if progress is not None:
            say(f"warning: {warning}")

    # Responses first, for every objective: what is not cached is generated in one go (on the
    # Ray engine, one pipeline over all objectives' rows: the workers load the model once).
    sets: list[tuple[str, Any, Path, list[dict[str, Any]]]] = []
    conversations_of: dict[str, list[list[dict[str, str]]]] = {}
    pending: dict[str, dict[str, Any]] = {}
    for name in names:
        obj = config.objectives[name]
        path = getattr(obj, split)
        if path is None:
            raise ConfigError(f"objectives.{name}.{split} is not set; name the {split} set file")
        out = Path(round_dir) / split / name
        with timed("report"):
            rows = load_eval_rows(path, name, obj.type)
        if limit is not None and limit < len(rows):
            # Evenly spaced rather than the first N: eval sets are often sorted by slice, and a
            # prefix would cover only the easiest ones.
            rows = [rows[(k * len(rows)) // limit] for k in range(limit)]
        sets.append((name, obj, out, rows))

        responses_file = out / "responses.parquet"
        responses_inputs = {**model_key, "eval_file": file_sha256(path), "limit": limit,
                            "ids": hash_obj([r["id"] for r in rows])}
        if check_marker(out / "responses.done.json", responses_inputs, [responses_file]).ok:
            say(f"{name}: responses cached ({len(rows)} rows)")
            conversations_of[name] = _read_conversations(responses_file, rows)
        elif stage_cache.restore(config.cache.stages_dir, "responses", responses_inputs, out,
                                 [responses_file.name]):
            # The same model already answered this set in another run (the stage cache).
            say(f"{name}: responses reused from the stage cache ({len(rows)} rows)")
            conversations_of[name] = _read_conversations(responses_file, rows)
            write_marker(out / "responses.done.json", responses_inputs, [responses_file], n=len(rows))
        else:
            pending[name] = responses_inputs

    on_ray = config.runtime.engine == "ray" and backend is None
    if pending and on_ray:
        todo = [(name, r) for name, _, _, rows in sets if name in pending for r in rows]
        say(f"generating {len(todo)} conversations of {', '.join(pending)} on Ray "
            f"({config.runtime.ray.workers} workers)")
        with timed("generate"):
            replies = generate_on_engine(config, model, adapter, [r for _, r in todo],
                                         what=f"{split} generation")
        for (name, _), conv in zip(todo, replies):
            conversations_of.setdefault(name, []).append(conv)
    for name, _, out, rows in sets:
        if name not in pending:
            continue
        if not on_ray:
            n_turns = sum(len(r["turns"]) for r in rows)
            say(f"{name}: generating {len(rows)} conversations ({n_turns} user turns)")
            backend_ = get_backend()
            with timed("generate"):
                conversations_of[name] = replay_rows(
                    backend_, rows, max_new_tokens=gen["max_new_tokens"],
                    temperature=gen["temperature"])
        responses_file = out / "responses.parquet"
        with timed("report"):
            _write_responses(responses_file, name, rows, conversations_of[name])
        write_marker(out / "responses.done.json", pending[name], [responses_file], n=len(rows))
        stage_cache.store(config.cache.stages_dir, "responses", pending[name], out,
                          [responses_file.name])

    reports: dict[str, FailureReport] = {}
    judge_failures: dict[str, int] = {}
    for name, obj, out, rows in sets:
        responses_file = out / "responses.parquet"
        conversations = conversations_of[name]
        samples_file = out / "samples.parquet"
        judge_obj = get_judge()
        samples_inputs = {"judge": judge_obj.identity(),
                          "responses": file_sha256(responses_file), "objective_type": obj.type}
        if check_marker(out / "samples.done.json", samples_inputs, [samples_file]).ok:
            say(f"{name}: judged samples cached")
            scored = _read_samples(samples_file)
        else:
            say(f"{name}: judging {len(rows)} responses with {judge_obj.name}")
            with timed("judge"):
                scored = _judge_and_score(name, obj.type, judge_obj, rows, conversations)
            with timed("report"):
                _write_samples(samples_file, name, scored)
            if any(s.judge_error for s in scored):
                # No marker: a rerun asks the judge again for the failed samples only (the LLM
                # judge's own cache answers the rest).
                (out / "samples.done.json").unlink(missing_ok=True)
            else:
                write_marker(out / "samples.done.json", samples_inputs, [samples_file], n=len(scored))

        with timed("report"):
            report = _objective_report(config, name, obj, round, scored, conversations, rows,
                                       samples_file, judge_failures)
            atomic_write_json(out / "report.json", report)
        reports[name] = report
        say(f"{name}: f = {report.f:.3f}" if report.f is not None else f"{name}: f = n/a (no valid samples)")

    model_label = str(model) if model is not None else json.dumps(_backend_identity(built["backend"], config),
                                                                   sort_keys=True)
    result = EvalReport(round=round, model=model_label, adapter=str(adapter) if adapter else None,
                        split=split, reports=reports, judge_failures=judge_failures)
    atomic_write_json(report_path(round_dir, split), result)
    return result


def _objective_report(config: MosaicConfig, name: str, obj: Any, round: int,
                      scored: Sequence[JudgedSample], conversations: Sequence[list[dict[str, str]]],
                      rows: Sequence[Mapping[str, Any]], samples_file: Path,
                      judge_failures: dict[str, int]) -> FailureReport:
    """The objective's FailureReport over the samples the judge labelled (the others are
    counted in `judge_failures`)."""
    from mosaic.eval.report import build_failure_report

    records = [SampleRecord(id=s.id, objective=name,
                            messages=[Message(**m) for m in conv], metadata=row["metadata"],
                            l3_prompt=s.l3_prompt, l3_response=s.l3_response, l2=s.l2, l1=s.l1)
               for s, conv, row in zip(scored, conversations, rows) if not s.judge_error]
    failed = len(scored) - len(records)
    if failed:
        judge_failures[name] = failed
        log.warning("%s: %d of %d samples have no judge verdict and are left out of f "
                    "(see %s, column judge_error)", name, failed, len(scored), samples_file)
    if not records:
        raise RuntimeError(f"{name}: the judge labelled none of the {len(scored)} samples; "
                           f"see {samples_file} (column judge_error)")
    return build_failure_report(name, obj.type, round, records, target=obj.target,
                                seed=config.seed)


# ---- judging ------------------------------------------------------------------------------------


def _labelled(call: Callable[[], Sequence[dict[str, Any]]], n: int, judge: Judge,
              what: str) -> tuple[list[dict[str, Any] | None], list[str | None]]:
    """Run one judge call over n items; bad judge output is data: keep what was labelled and
    record why the rest was not (a JudgeError carries both)."""
    errors: list[str | None] = [None] * n
    try:
        atoms: list[dict[str, Any] | None] = list(call())
    except JudgeError as e:
        atoms = list(e.partial)
        for f in e.failures:
            errors[f.index] = f"{what}: " + ("; ".join(f.errors) or "judge failure")
    if len(atoms) != n:
        raise RuntimeError(f"judge {judge.name!r} returned {len(atoms)} {what} results for {n} samples")
    return atoms, errors


def _judge_and_score(name: str, type_name: str, judge: Judge, rows: Sequence[Mapping[str, Any]],
                     conversations: Sequence[list[dict[str, str]]]) -> list[JudgedSample]:
    otype = get_objective_type(type_name)
    prompt_atoms: list[dict[str, Any] | None] = [dict(r["l3_prompt"]) or None for r in rows]
    errors: list[str | None] = [None] * len(rows)
    need_prompt = [i for i, p in enumerate(prompt_atoms) if p is None]
    if need_prompt:
        # Sets without prompt-channel atoms get them from the judge, from the user turns alone.
        users = [[m for m in conversations[i] if m["role"] == "user"] for i in need_prompt]
        got, errs = _labelled(lambda: judge.prompt_atoms(type_name, users), len(users), judge,
                              "prompt atoms")
        for i, atoms, err in zip(need_prompt, got, errs):
            prompt_atoms[i], errors[i] = atoms, err

    ok = [i for i in range(len(rows)) if prompt_atoms[i] is not None]
    responses: list[dict[str, Any] | None] = [None] * len(rows)
    got, errs = _labelled(lambda: judge.response_atoms(type_name, [conversations[i] for i in ok],
                                                       [prompt_atoms[i] for i in ok]),
                          len(ok), judge, "response atoms")
    for i, atoms, err in zip(ok, got, errs):
        responses[i], errors[i] = atoms, err

    per_turn = _per_turn_atoms(type_name, judge, conversations, prompt_atoms)
    scored = []
    for i, row in enumerate(rows):
        l2 = l1 = None
        if responses[i] is not None:
            try:
                l2, l1 = otype.score(prompt_atoms[i], responses[i])
            except (KeyError, TypeError, ValueError) as e:
                raise RuntimeError(f"{name}: sample {row['id']!r}: atoms do not fit objective type "
                                   f"{type_name!r} ({type(e).__name__}: {e}); prompt atoms "
                                   f"{prompt_atoms[i]}, response atoms {responses[i]}") from e
        elif errors[i] is None:
            errors[i] = "judge returned no atoms"
        scored.append(JudgedSample(id=row["id"], l3_prompt=prompt_atoms[i] or {},
                                   l3_response=responses[i], l3_response_turns=per_turn[i], l2=l2,
                                   l1=l1, judge_error=errors[i]))
    return scored


def _per_turn_atoms(type_name: str, judge: Judge, conversations: Sequence[list[dict[str, str]]],
                    prompt_atoms: Sequence[Mapping[str, Any] | None]) -> list[list[dict[str, Any]] | None]:
    """Response atoms of every earlier assistant turn of multi-turn conversations (e.g. when a
    jailbreak first leaked), recorded only where the judge says that is affordable."""
    out: list[list[dict[str, Any]] | None] = [None] * len(conversations)
    if not judge.capabilities.per_turn:
        return out
    prefixes, owners = [], []
    for i, conv in enumerate(conversations):
        if prompt_atoms[i] is None:
            continue
        ends = [j for j, m in enumerate(conv) if m["role"] == "assistant"]
        if len(ends) > 1:
            for j in ends[:-1]:
                prefixes.append(conv[:j + 1])
                owners.append(i)
    if not prefixes:
        return out
    atoms = judge.response_atoms(type_name, prefixes, [prompt_atoms[i] for i in owners])
    for i, a in zip(owners, atoms):
        out[i] = (out[i] or []) + [a]
    return out


# ---- parquet i/o ------------------------------------------------------------------------------


def _write_responses(path: Path, name: str, rows: Sequence[Mapping[str, Any]],
                     conversations: Sequence[list[dict[str, str]]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mosaic.data import MESSAGE_TYPE

    table = pa.table({
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "objective": pa.array([name] * len(rows), pa.string()),
        "messages": pa.array([[{"role": m["role"], "content": m["content"]} for m in c]
                              for c in conversations], MESSAGE_TYPE),
        "l3_prompt": pa.array([json.dumps(r["l3_prompt"], sort_keys=True) for r in rows], pa.string()),
        "metadata": pa.array([json.dumps(r["metadata"], sort_keys=True) for r in rows], pa.string()),
    })
    atomic_write_with(path, lambda tmp: pq.write_table(table, tmp))


def _read_conversations(path: Path, rows: Sequence[Mapping[str, Any]]) -> list[list[dict[str, str]]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["id", "messages"]).to_pylist()
    if [t["id"] for t in table] != [r["id"] for r in rows]:
        raise RuntimeError(f"{path} does not match its eval set (ids differ) although its marker "
                           f"does; delete the folder {path.parent} to regenerate")
    return [[{"role": m["role"], "content": m["content"]} for m in t["messages"]] for t in table]


def _write_samples(path: Path, name: str, scored: Sequence[JudgedSample]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def js(v: Any) -> str | None:
        return None if v is None else json.dumps(v, sort_keys=True)

    l1s = [s.l1 for s in scored]
    table = pa.table({
        "id": pa.array([s.id for s in scored], pa.string()),
        "objective": pa.array([name] * len(scored), pa.string()),
        "slice": pa.array([l1.slice if l1 else None for l1 in l1s], pa.string()),
        "score": pa.array([l1.score if l1 else None for l1 in l1s], pa.float64()),
        "valid": pa.array([l1.valid if l1 else False for l1 in l1s], pa.bool_()),
        "weight": pa.array([l1.weight if l1 else None for l1 in l1s], pa.float64()),
        "failure": pa.array([l1.failure if l1 else None for l1 in l1s], pa.bool_()),
        "l2": pa.array([js(s.l2) for s in scored], pa.string()),
        "l3_prompt": pa.array([js(s.l3_prompt) for s in scored], pa.string()),
        "l3_response": pa.array([js(s.l3_response) for s in scored], pa.string()),
        "l3_response_turns": pa.array([js(s.l3_response_turns) for s in scored], pa.string()),
        "judge_error": pa.array([s.judge_error for s in scored], pa.string()),
    })
    atomic_write_with(path, lambda tmp: pq.write_table(table, tmp))


def _read_samples(path: Path) -> list[JudgedSample]:
    import pyarrow.parquet as pq

    def js(v: str | None) -> Any:
        return json.loads(v) if v else None

    out = []
    for t in pq.read_table(path).to_pylist():
        l1 = None
        if t["slice"] is not None:
            l1 = L1(slice=t["slice"], score=t["score"], valid=t["valid"], weight=t["weight"],
                    failure=t["failure"])
        out.append(JudgedSample(id=t["id"], l3_prompt=json.loads(t["l3_prompt"]),
                                l3_response=js(t["l3_response"]),
                                l3_response_turns=js(t["l3_response_turns"]), l2=js(t["l2"]),
                                l1=l1, judge_error=t["judge_error"]))
    return out
