"""The one settings object of a run: YAML -> environment overrides -> frozen, saved in the run.

Secrets (API keys) never live in YAML or in the run directory: endpoints name the environment
variable that holds the key, and the key is read only when a client is built.

Environment overrides use `MOSAIC__<section>__<field>=value` (double underscores separate the
path; values are parsed as YAML scalars), e.g. `MOSAIC__loop__rounds=2`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mosaic.redact import looks_secret, redact_url, register_config_secrets

ENV_PREFIX = "MOSAIC__"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Names that become path components (objective names are folder names under every round; the
# run name labels reports): a letter or digit first, so "", ".", ".." and hidden names are out,
# and no separators, so "../../X" cannot write outside the run folder.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SAFE_NAME_HINT = ("1-64 letters, digits, '_', '-' or '.', starting with a letter or digit "
                  "(it becomes a folder name)")


def check_safe_name(value: str, what: str) -> str:
    """`value` if it can be a path component; otherwise a ValueError saying what is allowed."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value):
        shown = repr(value) if isinstance(value, str) and len(value) <= 80 else "(too long)"
        raise ValueError(f"{what} {shown} is not a safe name: use {SAFE_NAME_HINT}")
    return value


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message names file, field and fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        # Most settings are paths or become part of one; the OS refuses a NUL byte in a path
        # with a bare ValueError deep inside a stage, so it is refused here, naming the field.
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("contains a NUL byte (\\x00), which no file name or URL may hold")
        return value


class EndpointConfig(Section):
    """An OpenAI-compatible endpoint. The key is read from `api_key_env` at use time."""

    base_url: str | None = None
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0)
    concurrency: int = Field(8, ge=1)
    # Constrained JSON where a reply must be JSON (the judge's atoms, the planner's action):
    # "json_schema" sends OpenAI's {"type": "json_schema", ...} (OpenAI, vLLM, llama.cpp's own
    # llama-server); "json_object_schema" sends {"type": "json_object", "schema": ...}, which
    # llama-cpp-python's server turns into a grammar; "none" asks in the prompt only.
    response_format: Literal["none", "json_schema", "json_object_schema"] = "none"
    # What the endpoint charges, for cost estimates (`mosaic annotate`, `mosaic doctor`); None:
    # not known, and no cost is printed.
    price_per_1k_input: float | None = Field(None, ge=0)
    price_per_1k_output: float | None = Field(None, ge=0)

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        # A key pasted here instead of a variable name must fail, and without being repeated.
        if not _ENV_NAME.fullmatch(value):
            raise ValueError("expected the NAME of an environment variable holding the key "
                             "(letters, digits, underscores; e.g. OPENAI_API_KEY), not the key; "
                             "the value is not shown")
        return value

    def api_key(self) -> str:
        # Local servers (vLLM, llama.cpp) accept any key; the SDK insists on a non-empty one.
        return os.environ.get(self.api_key_env) or "EMPTY"


class ObjectiveConfig(Section):
    type: str
    pool: str | None = None  # training pool file (parquet/jsonl); sandbox fills these in
    eval: str | None = None  # eval set file
    heldout: str | None = None  # generalisation set from disjoint templates
    target: float = Field(4.5, ge=1, le=5)


class BudgetConfig(Section):
    max_tokens: int = Field(300_000, gt=0)


class WorldConfig(Section):
    """The sandbox world: seeded synthetic pools and eval sets (DESIGN.md)."""

    kind: Literal["sandbox", "files"] = "sandbox"
    seed: int = 0
    data_dir: str = "data/sandbox"
    pool_size: int = Field(3600, ge=100)  # prompts' responses per training pool
    eval_size: int = Field(240, ge=20)
    heldout_size: int = Field(240, ge=20)
    base_corpus_size: int = Field(6000, ge=100)
    # The tool world (mosaic/sandbox/tool_world.py): adds the `agentic` objective's pools and
    # eval sets and tool conversations to the base corpus (a different corpus, tokenizer and
    # so base model cache entry); off, the world is byte-identical to one without it.
    tool_world: bool = False


class ModelConfig(Section):
    # "sandbox" builds (once, cached) the tiny vulnerable base model; a GGUF file (a path, or
    # package:<module>/<file> inside an installed package) is converted once into a local HF
    # directory under cache_dir (mosaic.training.gguf_convert); otherwise a local HF path.
    base: str = "sandbox"
    cache_dir: str = ".cache/models"
    max_length: int = Field(320, ge=16)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class TrainingConfig(Section):
    # sft | dpo | sft+dpo (SFT on the chosen answers, then DPO from there on the same pairs)
    method: Literal["sft", "dpo", "sft+dpo"] = "sft"
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    learning_rate: float = Field(5e-4, gt=0)
    batch_size: int = Field(16, ge=1)
    epochs: float = Field(1.0, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    dpo_beta: float = Field(0.1, gt=0)
    # DPO's own learning rate (null: learning_rate). The sandbox values of beta and the rate
    # come from a measured sweep (bench/dpo_vs_sft.py, docs/dpo-sweep.json).
    dpo_learning_rate: float | None = Field(None, gt=0)
    # trl loss: sigmoid (DPO), sigmoid_norm (per-token normalised: no pull towards long
    # answers) or ipo.
    dpo_loss: Literal["sigmoid", "sigmoid_norm", "ipo"] = "sigmoid"
    # Weight of an NLL term on the chosen answer added to the DPO loss (trl's "sft" loss, as in
    # RPO): keeps the chosen answer likely while the margin grows. 0: plain DPO.
    dpo_sft_weight: float = Field(0.0, ge=0)
    # Length penalty for pairs of unequal length (trajectories): tokens of the longer answer
    # past the shorter one's length count with this weight (trl's LD-DPO `ld_alpha`);
    # null: every token counts (plain DPO), 0: only the shared length counts.
    dpo_length_alpha: float | None = Field(None, ge=0, le=1)
    # Each pair as one packed row, its prompt encoded once (training/packed_pairs.py: the same
    # loss as trl's two rows per pair, measured cheaper), where the model allows it; false:
    # trl's own layout.
    dpo_packed: bool = True
    seed: int = 0
    # `inprocess` trains in this process; `accelerate` runs the same trainer as `processes`
    # ranks under torchrun (the trainer's Accelerator: DDP over NCCL on GPUs, gloo on CPU; FSDP
    # with `fsdp`). `batch_size` is the global batch whatever the process count: each rank
    # takes batch_size / (processes x gradient_accumulation) rows per step.
    launcher: Literal["inprocess", "accelerate"] = "inprocess"
    processes: int = Field(1, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    fsdp: bool = False  # shard weights, gradients and optimiser state (models over one GPU)

    @model_validator(mode="after")
    def _global_batch(self) -> "TrainingConfig":
        if self.processes > 1 and self.launcher != "accelerate":
            raise ValueError(f"processes={self.processes} needs launcher: accelerate (the "
                             f"in-process trainer is one process)")
        if self.fsdp and self.launcher != "accelerate":
            raise ValueError("fsdp needs launcher: accelerate")
        split = self.processes * self.gradient_accumulation
        if self.batch_size % split:
            raise ValueError(f"batch_size {self.batch_size} (the global batch) must be a multiple "
                             f"of processes x gradient_accumulation = {split}; e.g. batch_size "
                             f"{split * max(1, round(self.batch_size / split))}")
        return self


class InferenceConfig(Section):
    backend: Literal["transformers", "openai", "vllm"] = "transformers"
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(0.0, ge=0)
    # transformers backend: "fast" (merged adapter, own decode loop, KV carried across replayed
    # turns) or "generate" (transformers' generate, the reference path); same greedy replies.
    decode: Literal["fast", "generate"] = "fast"
    endpoint: EndpointConfig | None = None

    @model_validator(mode="after")
    def _endpoint_for_openai(self) -> "InferenceConfig":
        if self.backend == "openai" and self.endpoint is None:
            raise ValueError("backend 'openai' needs an `endpoint` (base_url, model, api_key_env)")
        return self


JudgeKind = Literal["rule", "llm", "guard", "embedding"]


class GuardConfig(Section):
    """A guard model (safety classifier) served behind an OpenAI-compatible completions endpoint
    (vLLM). It decides the atoms its labels map to; `fallback` names the judge kind that labels
    the rest ("none": those rows are left unannotated, with the reason recorded)."""

    format: Literal["llama_guard3", "wildguard", "shieldgemma"]
    fallback: Literal["none", "rule", "llm", "embedding"] = "none"
    fallback_endpoint: EndpointConfig | None = None  # for fallback: llm
    max_tokens: int = Field(32, ge=1)  # the verdict is a line or two

    @model_validator(mode="after")
    def _endpoint_for_llm_fallback(self) -> "GuardConfig":
        if self.fallback == "llm" and self.fallback_endpoint is None:
            raise ValueError("guard fallback 'llm' needs a `fallback_endpoint` (base_url, model, "
                             "api_key_env)")
        return self


class JudgeConfig(Section):
    # rule: the sandbox's lexicons; llm: a chat model over an endpoint; guard: a guard model
    # (judge.guard) over an endpoint, with a fallback for the atoms it cannot decide;
    # embedding: offline heads over sentence embeddings, measured on real text
    # (eval/embedding_judge.py).
    kind: JudgeKind = "rule"
    endpoint: EndpointConfig | None = None  # the LLM judge's, or the guard model's server
    guard: GuardConfig | None = None
    cache_dir: str = ".cache/judge"
    # embedding judge: a folder with heads.json and card.json from `mosaic train-judge --out`;
    # None: the heads that ship with MOSAIC.
    heads: str | None = None
    # The rule judge is measured on the sandbox's text only (eval/rule_judge.py says how it
    # does on real text); it refuses other text unless this is set.
    allow_out_of_range: bool = False

    @model_validator(mode="after")
    def _endpoint_for_llm(self) -> "JudgeConfig":
        if self.kind in ("llm", "guard") and self.endpoint is None:
            raise ValueError(f"judge kind {self.kind!r} needs an `endpoint` (base_url, model, "
                             f"api_key_env)")
        if self.kind == "guard" and self.guard is None:
            raise ValueError("judge kind 'guard' needs a `guard` section (format: llama_guard3 | "
                             "wildguard | shieldgemma, fallback: none | rule | llm | embedding)")
        return self


class PlannerConfig(Section):
    kind: Literal["heuristic", "llm"] = "heuristic"
    endpoint: EndpointConfig | None = None
    max_revisions: int = Field(3, ge=0)
    # The heuristic planner's rule R9: off (every objective SFT) or the preference method it
    # tries per objective and keeps where its rounds gained more than SFT's.
    preference: Literal["off", "dpo", "sft+dpo"] = "off"

    @model_validator(mode="after")
    def _endpoint_for_llm(self) -> "PlannerConfig":
        if self.kind == "llm" and self.endpoint is None:
            raise ValueError("planner kind 'llm' needs an `endpoint` (base_url, model, api_key_env)")
        return self


class ChatConfig(Section):
    """`mosaic chat`: slash commands always work; free text needs a chat model endpoint."""

    endpoint: EndpointConfig | None = None


class LimitsConfig(Section):
    """Human limits on mixture weights (set in config or chat); the check enforces them."""

    floors: dict[str, float] = Field(default_factory=dict)
    ceilings: dict[str, float] = Field(default_factory=dict)
    max_change: float | None = Field(None, gt=0, le=1)  # per-round change of a mixture weight

    def tightened(self, human: dict[str, Any] | None) -> "LimitsConfig":
        """These limits with a person's standing limits (set in chat) applied; the tighter of
        the two wins everywhere. Acceptance guards are not mixture limits and are ignored."""
        human = human or {}
        floors = {**self.floors, **{k: max(float(v), self.floors.get(k, 0.0))
                                    for k, v in (human.get("floors") or {}).items()}}
        ceilings = {**self.ceilings, **{k: min(float(v), self.ceilings.get(k, 1.0))
                                        for k, v in (human.get("ceilings") or {}).items()}}
        changes = [c for c in (self.max_change, human.get("max_change")) if c is not None]
        return LimitsConfig(floors=floors, ceilings=ceilings,
                            max_change=min(changes) if changes else None)


class CacheConfig(Section):
    """Content-addressed stage cache shared across runs: a round whose dataset, base model and
    training settings were trained before reuses that adapter, and replies already generated by
    the same model on the same eval set are reused (the benchmark's many runs). Off when null."""

    stages_dir: str | None = None


class RayConfig(Section):
    """The Ray cluster and the actor pool each data-parallel stage runs on (`mosaic.engine`)."""

    # `ray.init(address=...)`: "auto" or "ray://head:10001" joins a running cluster; None
    # starts a local one on this machine (once per process).
    address: str | None = None
    local_cpus: int | None = Field(None, ge=1)  # CPUs of that local cluster; None: all
    workers: int = Field(2, ge=1)  # actors per stage, each holding one backend
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    # Rows per batch sent to an actor. None: for generation, inference.batch_size (a worker
    # then generates at the local path's batch: at 32 rows against 64, 1 worker took 74 s
    # where 96 took 61 s, bench/ray_bench.py); for annotation, the command's batch size.
    batch_rows: int | None = Field(None, ge=1)
    # A killed or crashed worker is restarted and its batch run again this many times.
    max_retries: int = Field(3, ge=0)


class RuntimeConfig(Section):
    """How this machine (or cluster) runs the stages."""

    # Intra-op CPU threads for training and local generation; None: the measured policy
    # (`mosaic.training.models.cpu_threads`). GPUs and large models keep torch's default.
    threads: int | None = Field(None, ge=1)
    # Where annotation and eval generation run: this process, or Ray Data over an actor pool.
    # Both give the same replies and atoms; `ray` needs the optional extra (`[ray]`).
    engine: Literal["local", "ray"] = "local"
    ray: RayConfig = RayConfig()


class LoopConfig(Section):
    rounds: int = Field(5, ge=0)
    # Evaluate every round on the held-out sets too (the baseline always is). Off, only the
    # eval sets are generated each round; held-out scores are then measured where needed (the
    # benchmark does it for each run's final point).
    heldout_every_round: bool = True
    # Candidate actions per round: above 1 the planner proposes this many, each passing one is
    # built, trained and evaluated in round_<k>/candidates/<j>/ (Ray tasks side by side on
    # runtime.engine: ray) and the one that adds most to the archive's hypervolume is kept
    # (mosaic.tools.candidates). 1: one action per round.
    candidates: int = Field(1, ge=1)


class MosaicConfig(Section):
    name: str = "mosaic"  # the run's name (a safe identifier: see SAFE_NAME)
    run_dir: str = "runs/sandbox"
    seed: int = 0
    budget: BudgetConfig = BudgetConfig()
    objectives: dict[str, ObjectiveConfig]
    world: WorldConfig = WorldConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    inference: InferenceConfig = InferenceConfig()
    judge: JudgeConfig = JudgeConfig()
    planner: PlannerConfig = PlannerConfig()
    chat: ChatConfig = ChatConfig()
    limits: LimitsConfig = LimitsConfig()
    loop: LoopConfig = LoopConfig()
    cache: CacheConfig = CacheConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @field_validator("name")
    @classmethod
    def _safe_run_name(cls, value: str) -> str:
        return check_safe_name(value, "run name")

    @field_validator("objectives")
    @classmethod
    def _safe_objective_names(cls, value: dict[str, ObjectiveConfig]) -> dict[str, ObjectiveConfig]:
        folded: dict[str, str] = {}
        for name in value:
            check_safe_name(name, "objective name")
            # On case-insensitive file systems (macOS, Windows) these would share one folder.
            if name.lower() in folded:
                raise ValueError(f"objective names {folded[name.lower()]!r} and {name!r} differ "
                                 f"only in case; their folders would collide; rename one")
            folded[name.lower()] = name
        return value

    @model_validator(mode="after")
    def _check_objectives(self) -> "MosaicConfig":
        # Objective *type* names are plug-ins registered by `mosaic.eval`; config stays below
        # eval in the import graph, so `mosaic.eval.check_objective_types` checks them.
        if not self.objectives:
            raise ValueError("at least one objective is required")
        for kind, limits in (("floors", self.limits.floors), ("ceilings", self.limits.ceilings)):
            for name in limits:
                if name not in self.objectives:
                    raise ValueError(f"limits.{kind} names unknown objective {name!r}; "
                                     f"objectives are {sorted(self.objectives)}")
        return self


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"environment override {ENV_PREFIX}{'__'.join(path)}: "
                              f"{key!r} is not a section")
    node[path[-1]] = value


def _env_vars(environ: dict[str, str] | None) -> dict[str, str]:
    """`MOSAIC__a__b` variables as {"a.b": variable name}."""
    environ = os.environ if environ is None else environ
    return {key[len(ENV_PREFIX):].lower().replace("__", "."): key
            for key in environ if key.startswith(ENV_PREFIX) and len(key) > len(ENV_PREFIX)}


def env_overrides(environ: dict[str, str] | None = None) -> dict[str, Any]:
    environ = dict(os.environ if environ is None else environ)
    out: dict[str, Any] = {}
    for path, key in _env_vars(environ).items():
        raw = environ[key]
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            # The value is not repeated: an override may hold anything, a key included.
            raise ConfigError(f"environment variable {key}: not a valid YAML value "
                              f"({_yaml_problem(e)}); quote it to pass a plain string") from None
        _set_path(out, path.split("."), value)
    return out


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What the YAML parser objected to and where, never the text around it (PyYAML's own
    message quotes the offending line, which may hold a key)."""
    problem = getattr(err, "problem", None) or type(err).__name__
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


_SECRET_WORDS = ("key", "secret", "token", "password")


def _format_errors(source: str, err: ValidationError, from_env: dict[str, str]) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        field = ".".join(loc) or "(top level)"
        got = e.get("input")
        # Never echo a value that may be a secret: unknown fields can hold anything, and a
        # key pasted into the config by mistake must not end up in a terminal or a CI log.
        secretish = (any(w in part.lower() for part in loc for w in _SECRET_WORDS)
                     or looks_secret(got if isinstance(got, str) else repr(got)))
        echo = not (isinstance(got, dict) or secretish or e["type"] == "extra_forbidden")
        got_s = f" (got {got!r})" if echo else ""
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field; check the spelling against configs/sandbox.yaml"
        env_var = next((var for path, var in from_env.items()
                        if field == path or field.startswith(path + ".")), None)
        where = f" [set by environment variable {env_var}]" if env_var else ""
        lines.append(f"  - {field}: {msg}{got_s}{where}")
    return "\n".join(lines)


def load_config(path: str | Path, environ: dict[str, str] | None = None,
                overrides: dict[str, Any] | None = None) -> MosaicConfig:
    """YAML file -> `MOSAIC__...` environment overrides -> explicit overrides -> validated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (invalid byte at offset "
                          f"{e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, "
                          f"got {type(data).__name__}")
    data = _merge(data, env_overrides(environ))
    if overrides:
        data = _merge(data, overrides)
    try:
        config = MosaicConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(str(path), e, _env_vars(environ))) from None
    # From here on, every text MOSAIC prints or writes hides the keys and URL credentials
    # this config points at (mosaic.redact).
    register_config_secrets(config)
    return config


_ENDPOINT_PATHS = (("inference", "endpoint"), ("judge", "endpoint"), ("planner", "endpoint"),
                   ("chat", "endpoint"), ("judge", "guard", "fallback_endpoint"))


def public_settings(config: MosaicConfig) -> dict[str, Any]:
    """The settings as saved and shown: credentials in endpoint URLs (`user:pass@`,
    `?api_key=`) are ***; keys themselves are never held (endpoints name their variable)."""
    data = config.model_dump(mode="json")
    for path in _ENDPOINT_PATHS:
        node: Any = data
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get("base_url"):
            node["base_url"] = redact_url(node["base_url"])
    return data


def masked_urls(config: MosaicConfig) -> list[str]:
    """Endpoint URL fields whose credentials were masked when saved (`***`): a run resumed
    from its saved settings needs them given again."""
    out = []
    for path in _ENDPOINT_PATHS:
        node: Any = config
        for key in path:
            node = getattr(node, key, None)
        url = getattr(node, "base_url", None)
        if url and redact_url(url) == url and "***" in url:
            out.append(".".join(path) + ".base_url")
    return out


def dump_config(config: MosaicConfig) -> str:
    """YAML of the resolved settings, as saved into the run folder and printed by `mosaic
    config` (no secrets: see `public_settings`)."""
    return yaml.safe_dump(public_settings(config), sort_keys=False)
