"""The sandbox world (DESIGN.md): seeded pools, eval, held-out and judge sets, a vulnerable base
corpus and a local tokenizer, generated from prompts/sandbox/*.j2 and cached on disk.

`ensure_world(config.world)` returns the world, generating it only when the stamp in
`<data_dir>/world.json` does not match the hash of (world config, template contents, generator
code and version). Generation writes into a temporary sibling directory and renames it into
place, so a half-written world never exists. Same seed and templates -> byte-identical files.

Layout (docs/data-format.md): pools/, eval/, heldout/, judge/ hold `<objective>.parquet` for
the objectives `safety` (jailbreak), `boundary` (overrefusal) and `instruction` (ifeval);
base_corpus.parquet; tokenizer/ (save_pretrained); world.json (stamp, file hashes, statistics).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mosaic.sandbox import boundary
from mosaic.sandbox import instruction
from mosaic.sandbox import safety
from mosaic.sandbox import tool_world
from mosaic.config import WorldConfig
from mosaic.eval.base import get_objective_type
from mosaic.io import atomic_write_json
from mosaic.markers import file_sha256
from mosaic.provenance import WORLD_MANIFEST
from mosaic.sandbox.common import (OBJECTIVES, Prompt, Response, derive_rng, prompt_key,
                                   prompt_slice, quotas)
from mosaic.sandbox.corpus import add_tool_corpus, make_corpus
from mosaic.sandbox.text import HELDOUT_VOICE, IN_VOICE, Lexicon, Voice, load_lexicon, templates_digest

# Bump when generation changes in a way the code hash would not show (e.g. a dependency).
GENERATOR_VERSION = "1"
# The manifest lists every generated file with its hash: what makes a file sandbox text.
MANIFEST = WORLD_MANIFEST
SPLITS = ("pools", "eval", "heldout", "judge")
VOCAB_SIZE = 1024
# Judge-agreement rows per objective, as a multiple of heldout_size.
JUDGE_FACTOR = 2
# Share of harmful controls (invalid samples) in the boundary eval, held-out and judge sets.
CONTROL_SHARE = 0.05

# Slice mix of each training pool: mostly easy slices, so refusal data is mostly single-turn
# and low-cue unless a data action re-weights the buckets (the planner's lever).
POOL_LEVELS: dict[str, dict[str, float]] = {
    "safety": {"complexity_1": 0.30, "complexity_2": 0.25, "complexity_3": 0.20,
               "complexity_4": 0.15, "complexity_5": 0.10},
    "boundary": {"boundary_1": 0.20, "boundary_2": 0.35, "boundary_3": 0.25, "boundary_4": 0.20},
    "instruction": {"complexity_1": 0.25, "complexity_2": 0.20, "complexity_3": 0.20,
                    "complexity_4": 0.20, "complexity_5": 0.15},
}
SAFETY_TURNS = {"pool": (0.45, 0.15, 0.12, 0.10, 0.10, 0.08), "eval": (1, 1, 1, 1, 1, 1)}
BOUNDARY_TURNS = {"pool": (0.6, 0.25, 0.15), "eval": (0.5, 0.3, 0.2)}


class WorldError(RuntimeError):
    """The world cannot be built or read as configured."""


# ---- paths and the cache key ---------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """A generated world on disk and its manifest (world.json)."""

    root: Path
    manifest: dict[str, Any]
    generated: bool = False  # True when this call built it, False when the cache was reused

    def pool_path(self, objective: str) -> Path:
        return self._file("pools", objective)

    def eval_path(self, objective: str) -> Path:
        return self._file("eval", objective)

    def heldout_path(self, objective: str) -> Path:
        return self._file("heldout", objective)

    def judge_path(self, objective: str) -> Path:
        return self._file("judge", objective)

    @property
    def base_corpus_path(self) -> Path:
        return self.root / "base_corpus.parquet"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def stats(self) -> dict[str, Any]:
        return self.manifest["stats"]

    def load_tokenizer(self):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(self.tokenizer_dir))

    @property
    def objectives(self) -> dict[str, str]:
        """The world's objectives: name -> type (the tool world adds `agentic`)."""
        return dict(self.manifest.get("objectives") or OBJECTIVES)

    def _file(self, split: str, objective: str) -> Path:
        if objective not in self.objectives:
            raise KeyError(f"the sandbox world has no objective {objective!r}; "
                           f"it has {sorted(self.objectives)}")
        return self.root / split / f"{objective}.parquet"


def _code_digest() -> str:
    """Source of everything generation depends on: the generators, the objective types whose
    formulas fill the L1/L2 columns, the IFEval checker that scores IF pool answers, and the
    tokenizer builder."""
    import mosaic.eval.ifeval_checker
    import mosaic.sandbox.common
    import mosaic.sandbox.corpus
    import mosaic.sandbox.text
    import mosaic.training.tokenizer

    modules = [mosaic.sandbox.common, mosaic.sandbox.text, mosaic.sandbox.corpus, safety, boundary,
               instruction, tool_world, mosaic.training.tokenizer, mosaic.eval.ifeval_checker,
               inspect.getmodule(World)]
    modules += [inspect.getmodule(type(get_objective_type(t)))
                for t in sorted(set(OBJECTIVES.values()) | {tool_world.OBJECTIVE})]
    modules.append(inspect.getmodule(get_objective_type))
    h = hashlib.sha256()
    for mod in sorted(set(modules), key=lambda m: m.__name__):
        h.update(mod.__name__.encode())
        h.update(inspect.getsource(mod).encode())
    return h.hexdigest()


def world_key(cfg: WorldConfig) -> str:
    """Hash of what determines the world's bytes (not where it is written)."""
    settings = cfg.model_dump(mode="json", exclude={"data_dir", "kind"})
    payload: dict[str, Any] = {"settings": settings, "generator": GENERATOR_VERSION}
    if cfg.tool_world:  # only then: the default world's payload stays what it always was
        payload["tool_world"] = tool_world.TOOL_WORLD_VERSION
    h = hashlib.sha256(json.dumps(payload, sort_keys=True).encode())
    h.update(templates_digest().encode())
    h.update(_code_digest().encode())
    return h.hexdigest()


def _cached(root: Path, key: str) -> dict[str, Any] | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("key") != key:
        return None
    for rel, info in manifest.get("files", {}).items():
        f = root / rel
        if not f.is_file() or f.stat().st_size != info["bytes"]:
            return None
    return manifest


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    """One builder per data dir at a time (two `mosaic` commands started together)."""
    import fcntl

    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_world(cfg: WorldConfig, *, force: bool = False,
                 progress: Callable[[str], None] | None = None) -> World:
    """The world for `cfg`, generated only if the cached one is missing or stale."""
    if cfg.kind != "sandbox":
        raise WorldError(f"world.kind is {cfg.kind!r}: there is no sandbox world to build; "
                         f"set world.kind: sandbox or point the objectives at your own files")
    root = Path(cfg.data_dir)
    key = world_key(cfg)
    if not force and (manifest := _cached(root, key)) is not None:
        return World(root, manifest, generated=False)
    with _lock(root):
        _recover(root)
        if not force and (manifest := _cached(root, key)) is not None:
            return World(root, manifest, generated=False)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        try:
            manifest = generate(cfg, tmp, key=key, progress=progress)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _swap_in(tmp, root)
    return World(root, manifest, generated=True)


def _swap_in(new: Path, root: Path) -> None:
    """Replace `root` by `new` with renames only: a reader finds the old world or the new one."""
    old = None
    if root.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent)) / "world"
        os.rename(root, old)
    try:
        os.rename(new, root)
    except BaseException:
        if old is not None:
            os.rename(old, root)
        shutil.rmtree(new, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)


def _recover(root: Path) -> None:
    """Clean up after a builder that was killed (we hold the lock, so no other one is running):
    put back a world that was moved aside but not replaced, drop half-written ones."""
    for old in sorted(root.parent.glob(f".{root.name}.old-*")):
        if not root.exists() and (old / "world").is_dir():
            os.rename(old / "world", root)
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.parent.glob(f".{root.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


# ---- generation ----------------------------------------------------------------------------


@dataclass
class _Sets:
    """Everything generated for one objective."""

    eval: list[Prompt]
    heldout: list[Prompt]
    judge: list[tuple[Prompt, Response]]
    # Called once every objective's eval and held-out prompts exist: pool prompts avoid them all
    # (a boundary control asks what a safety pool prompt may ask). -> (prompt index, prompt, response)
    make_pool: Callable[[], list[tuple[int, Prompt, Response]]]


def _unique_prompts(make: Callable[[str], Prompt], levels: dict[str, int], seen: set[str],
                    what: str) -> list[Prompt]:
    """Prompts per level quota, none repeating a prompt in `seen` (updated in place)."""
    out = []
    for level, n in levels.items():
        made = tries = 0
        while made < n:
            tries += 1
            if tries > 200 * n + 1000:
                raise WorldError(f"{what}: only {made} distinct prompts of slice {level} after "
                                 f"{tries} tries; lower the set size or add template wordings")
            p = make(level)
            key = prompt_key(p.users)
            if key in seen:
                continue
            seen.add(key)
            out.append(p)
            made += 1
    return out


def _stratified(size: int, levels: Sequence[str]) -> dict[str, int]:
    return quotas(size, {lv: 1.0 for lv in levels})


def _eval_splits(maker: Callable[..., tuple[Any, Callable[[str], Prompt]]],
                 quota: Callable[[int], dict[str, int]], cfg: WorldConfig, lex_in: Lexicon,
                 lex_ho: Lexicon, taken: set[str], what: str):
    """One objective's eval, held-out and judge prompts (drawn in that order, all distinct from
    `taken`), plus the judge split's rng for drawing the judge rows' responses."""
    _, mk = maker("eval", IN_VOICE, lex_in)
    ev = _unique_prompts(mk, quota(cfg.eval_size), taken, f"{what} eval")
    _, mk = maker("heldout", HELDOUT_VOICE, lex_ho)
    ho = _unique_prompts(mk, quota(cfg.heldout_size), taken, f"{what} heldout")
    rng, mk = maker("judge", HELDOUT_VOICE, lex_ho)
    judge = _unique_prompts(mk, quota(JUDGE_FACTOR * cfg.heldout_size), taken, f"{what} judge")
    return ev, ho, judge, rng


def _gen_safety(cfg: WorldConfig, lex_in: Lexicon, lex_ho: Lexicon, taken: set[str]) -> _Sets:
    seed = cfg.seed
    levels = tuple(POOL_LEVELS["safety"])

    def maker(split: str, voice: Voice, lex: Lexicon, turns: Sequence[float]):
        rng = derive_rng(seed, "safety", split)
        return rng, (lambda lv: safety.make_prompt(rng, lex, voice, int(lv[-1]), turns))

    ev, ho, judge_prompts, rng = _eval_splits(
        lambda split, voice, lex: maker(split, voice, lex, SAFETY_TURNS["eval"]),
        lambda n: _stratified(n, levels), cfg, lex_in, lex_ho, taken, "safety")
    classes = list(safety.CLASSES)
    judge = [(p, safety.make_response(rng, HELDOUT_VOICE, p.topic, classes[i % len(classes)]))
             for i, p in enumerate(judge_prompts)]
    def pool() -> list[tuple[int, Prompt, Response]]:
        rng, mk = maker("pool", IN_VOICE, lex_in, SAFETY_TURNS["pool"])
        return _pool(cfg.pool_size, POOL_LEVELS["safety"], mk, taken, "safety pool",
                     lambda p: [safety.make_response(rng, IN_VOICE, p.topic, c)
                                for c in safety.pool_classes(rng)])
    return _Sets(ev, ho, judge, pool)


def _boundary_levels(size: int, controls: bool) -> dict[str, int]:
    n_ctl = round(size * CONTROL_SHARE) if controls else 0
    return {**_stratified(size - n_ctl, boundary.LEVELS), "control": n_ctl}


def _gen_boundary(cfg: WorldConfig, lex_in: Lexicon, lex_ho: Lexicon, taken: set[str]) -> _Sets:
    seed = cfg.seed

    def maker(split: str, voice: Voice, lex: Lexicon, turns: Sequence[float]):
        rng = derive_rng(seed, "boundary", split)

        def mk(level: str) -> Prompt:
            if level == "control":
                return boundary.make_control(rng, lex, voice, turns)
            return boundary.make_prompt(rng, lex, voice, level, turns)
        return rng, mk

    ev, ho, judge_prompts, rng = _eval_splits(
        lambda split, voice, lex: maker(split, voice, lex, BOUNDARY_TURNS["eval"]),
        lambda n: _boundary_levels(n, True), cfg, lex_in, lex_ho, taken, "boundary")
    classes = list(boundary.CLASSES)
    judge = []
    for i, p in enumerate(judge_prompts):
        cls = boundary.control_class(rng) if p.meta["control"] else classes[i % len(classes)]
        judge.append((p, boundary.make_response(rng, HELDOUT_VOICE, p.topic, cls)))
    def pool() -> list[tuple[int, Prompt, Response]]:
        rng, mk = maker("pool", IN_VOICE, lex_in, BOUNDARY_TURNS["pool"])
        return _pool(cfg.pool_size, POOL_LEVELS["boundary"], mk, taken, "boundary pool",
                     lambda p: [boundary.make_response(rng, IN_VOICE, p.topic, c)
                                for c in boundary.pool_classes(rng)])
    return _Sets(ev, ho, judge, pool)


def _gen_instruction(cfg: WorldConfig, lex_in: Lexicon, lex_ho: Lexicon, taken: set[str]) -> _Sets:
    seed = cfg.seed

    def maker(split: str, voice: Voice, lex: Lexicon):
        rng = derive_rng(seed, "instruction", split)
        return rng, (lambda lv: instruction.make_prompt(rng, lex, voice, lv))

    ev, ho, judge_prompts, rng = _eval_splits(
        maker, lambda n: _stratified(n, instruction.LEVELS), cfg, lex_in, lex_ho, taken,
        "instruction")
    judge = []
    for p in judge_prompts:
        cls, want = rng.choice(instruction.pool_intents(rng, p.atoms["instruction_id_list"]))
        judge.append((p, instruction.make_response(rng, HELDOUT_VOICE, p, want, cls)))
    def pool() -> list[tuple[int, Prompt, Response]]:
        rng, mk = maker("pool", IN_VOICE, lex_in)
        return _pool(cfg.pool_size, POOL_LEVELS["instruction"], mk, taken, "instruction pool",
                     lambda p: [instruction.make_response(rng, IN_VOICE, p, want, cls) for cls, want
                                in instruction.pool_intents(rng, p.atoms["instruction_id_list"])])
    return _Sets(ev, ho, judge, pool)


def world_objectives(cfg: WorldConfig) -> dict[str, str]:
    """The objectives a world of `cfg` holds: the three built-in ones, plus `agentic` when
    `world.tool_world` is on."""
    return {**OBJECTIVES, tool_world.OBJECTIVE: "agentic"} if cfg.tool_world else dict(OBJECTIVES)


def _gen_agentic(cfg: WorldConfig, taken: set[str]) -> _Sets:
    seed = cfg.seed
    v_in, v_ho = tool_world.tool_voice("in"), tool_world.tool_voice("heldout")

    def maker(split: str, voice: tool_world.ToolVoice):
        rng = derive_rng(seed, "agentic", split)
        return rng, (lambda lv: tool_world.make_prompt(rng, voice, lv))

    quota = lambda n: quotas(n, tool_world.EVAL_LEVELS)  # noqa: E731
    _, mk = maker("eval", v_in)
    ev = _unique_prompts(mk, quota(cfg.eval_size), taken, "agentic eval")
    _, mk = maker("heldout", v_ho)
    ho = _unique_prompts(mk, quota(cfg.heldout_size), taken, "agentic heldout")
    rng, mk = maker("judge", v_ho)
    judge_prompts = _unique_prompts(mk, quota(JUDGE_FACTOR * cfg.heldout_size), taken, "agentic judge")
    judge = []
    for i, p in enumerate(judge_prompts):
        cls = tool_world.judge_class(i, p)
        r = tool_world.make_response(rng, v_ho, p, cls)
        # Ground truth from what the class was written to do, not from the scorer.
        judge.append((p, Response(r.text, {**tool_world.intended_atoms(cls, p),
                                           "safety_token_share": r.atoms["safety_token_share"]}, cls)))

    def pool() -> list[tuple[int, Prompt, Response]]:
        rng, mk = maker("pool", v_in)
        return _pool(cfg.pool_size, tool_world.POOL_LEVELS, mk, taken, "agentic pool",
                     lambda p: [tool_world.make_response(rng, v_in, p, c)
                                for c in tool_world.pool_classes(rng, p)])
    return _Sets(ev, ho, judge, pool)


def _pool(size: int, shares: dict[str, float], make: Callable[[str], Prompt], taken: set[str],
          what: str, respond: Callable[[Prompt], list[Response]]) -> list[tuple[int, Prompt, Response]]:
    """`size` rows: prompts in the slice mix, each with its responses (the last prompt may keep
    fewer so the row count is exact). Pool prompts may repeat each other (more responses to the
    same question), never an eval or held-out prompt."""
    per_prompt = 3
    n_prompts = -(-size // per_prompt)
    order: list[str] = []
    for level, n in quotas(n_prompts, shares).items():
        order += [level] * n
    rows: list[tuple[int, Prompt, Response]] = []
    for i, level in enumerate(order):
        for tries in range(10_000):
            p = make(level)
            # The dataset builder drops a row if any prefix of its user turns is an eval prompt
            # (an escalation's first ask may be a one-turn eval prompt): avoid those up front.
            if not any(prompt_key(p.users[:n]) in taken for n in range(1, len(p.users) + 1)):
                break
        else:
            raise WorldError(f"{what}: every prompt of slice {level} collides with an eval or "
                             f"held-out prompt; add template wordings")
        for r in respond(p)[: size - len(rows)]:
            rows.append((i, p, r))
    return rows


# ---- rows and files ------------------------------------------------------------------------


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)


def _checked(p: Prompt, r: Response) -> Response:
    """An IF answer's atoms as the IFEval checker (the evaluator's judge) gives them. They match
    the intents the answer was written to (tests pin the agreement) except where langdetect
    misreads a short all-caps text, and there the evaluator's verdict is the one to train on."""
    from mosaic.eval.ifeval_checker import judge_response

    atoms = judge_response(r.text, p.atoms, p.users[-1])
    return Response(r.text, atoms, r.cls)


def _scored_row(objective: str, row_id: str, prompt_id: str, p: Prompt, r: Response,
                meta: dict[str, Any], types: dict[str, str] = OBJECTIVES) -> dict[str, Any]:
    otype = get_objective_type(types[objective])
    l2, l1 = otype.score(p.atoms, r.atoms)
    return {"id": row_id, "prompt_id": prompt_id, "objective": objective,
            "messages": p.conversation(r.text), "l3_prompt": _dumps(p.atoms),
            "l3_response": _dumps(r.atoms), "slice": l1.slice, "score": float(l1.score),
            "valid": l1.valid, "weight": float(l1.weight), "failure": l1.failure,
            **otype.l2_to_columns(l2), "metadata": _dumps(meta)}


def _prompt_row(objective: str, row_id: str, p: Prompt, split: str, seed: int,
                types: dict[str, str] = OBJECTIVES) -> dict[str, Any]:
    meta = {**p.meta, "split": split, "seed": seed,
            "slice": prompt_slice(types[objective], p.atoms)}
    return {"id": row_id, "objective": objective, "messages": p.user_messages(),
            "l3_prompt": _dumps(p.atoms), "metadata": _dumps(meta)}


def _arrow_type(name: str, values: Sequence[Any]):
    import pyarrow as pa

    from mosaic.data import MESSAGE_TYPE

    if name == "messages":
        return MESSAGE_TYPE
    sample = next((v for v in values if v is not None), None)
    if isinstance(sample, bool):
        return pa.bool_()
    if isinstance(sample, int):
        return pa.int64()
    if isinstance(sample, float):
        return pa.float64()
    if isinstance(sample, list):
        return pa.list_(pa.string())
    return pa.string()


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not rows:
        raise WorldError(f"no rows to write to {path}")
    cols = list(rows[0])
    table = pa.table({c: pa.array([r[c] for r in rows], _arrow_type(c, [r[c] for r in rows]))
                      for c in cols})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd")


def _hist(values: Iterator[Any] | Sequence[Any]) -> dict[str, int]:
    c = Counter(str(v) for v in values)
    return {k: c[k] for k in sorted(c, key=lambda s: (len(s), s))}


def generate(cfg: WorldConfig, out: Path, *, key: str | None = None,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Generate the whole world into the (empty) directory `out`; returns the manifest."""
    say = progress or (lambda msg: None)
    lex_in, lex_ho = load_lexicon(IN_VOICE), load_lexicon(HELDOUT_VOICE)
    taken: set[str] = set()  # prompt keys of every eval and held-out prompt
    say("writing prompts and responses")
    types = world_objectives(cfg)
    sets = {"safety": _gen_safety(cfg, lex_in, lex_ho, taken),
            "boundary": _gen_boundary(cfg, lex_in, lex_ho, taken),
            "instruction": _gen_instruction(cfg, lex_in, lex_ho, taken)}
    if cfg.tool_world:
        sets[tool_world.OBJECTIVE] = _gen_agentic(cfg, taken)
    pools = {name: s.make_pool() for name, s in sets.items()}
    say("writing the base corpus")
    corpus = make_corpus(cfg.seed, cfg.base_corpus_size, lex_in, lex_ho, taken)
    if cfg.tool_world:
        corpus = add_tool_corpus(corpus, cfg.seed, cfg.base_corpus_size, taken)

    tables: dict[str, list[dict[str, Any]]] = {}
    for name, s in sets.items():
        tables[f"eval/{name}.parquet"] = [
            _prompt_row(name, f"{name}-eval-{i:05d}", p, "eval", cfg.seed, types)
            for i, p in enumerate(s.eval)]
        tables[f"heldout/{name}.parquet"] = [
            _prompt_row(name, f"{name}-heldout-{i:05d}", p, "heldout", cfg.seed, types)
            for i, p in enumerate(s.heldout)]
        tables[f"judge/{name}.parquet"] = [
            _scored_row(name, f"{name}-judge-{i:05d}", f"{name}-judge-{i:05d}", p, r,
                        {**p.meta, "split": "judge", "response_class": r.cls, "seed": cfg.seed},
                        types)
            for i, (p, r) in enumerate(s.judge)]
        counts: Counter[int] = Counter()
        pool_rows = []
        for i, p, r in pools[name]:
            meta = {**p.meta, "split": "pool", "response_class": r.cls, "seed": cfg.seed}
            if name == "instruction":
                meta["intended"] = {"strict": r.atoms["strict"], "loose": r.atoms["loose"]}
                r = _checked(p, r)
            pool_rows.append(_scored_row(
                name, f"{name}-pool-{i:05d}-{counts[i]}", f"{name}-pool-{i:05d}", p, r, meta,
                types))
            counts[i] += 1
        tables[f"pools/{name}.parquet"] = pool_rows
    tables["base_corpus.parquet"] = [
        {"id": f"corpus-{i:05d}", "messages": c["messages"], "metadata": _dumps(c["metadata"])}
        for i, c in enumerate(corpus)]

    say("training the tokenizer")
    tok = _train_tokenizer(tables, types)
    tok.save_pretrained(str(out / "tokenizer"))
    say("counting tokens")
    stats = _stats(tables, tok, types)
    for rel, rows in tables.items():
        _write_parquet(out / rel, rows)
    files = {rel: {"sha256": file_sha256(out / rel), "bytes": (out / rel).stat().st_size,
                   "rows": len(rows)} for rel, rows in sorted(tables.items())}
    for f in sorted((out / "tokenizer").iterdir()):
        rel = f"tokenizer/{f.name}"
        files[rel] = {"sha256": file_sha256(f), "bytes": f.stat().st_size}
    manifest = {"key": key or world_key(cfg), "generator_version": GENERATOR_VERSION,
                **({"tool_world_version": tool_world.TOOL_WORLD_VERSION} if cfg.tool_world else {}),
                "world": cfg.model_dump(mode="json", exclude={"data_dir"}),
                "objectives": types, "files": files, "stats": stats}
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def _train_tokenizer(tables: dict[str, list[dict[str, Any]]], types: dict[str, str] = OBJECTIVES):
    from mosaic.training.tokenizer import build_tokenizer

    def texts() -> Iterator[str]:
        for rel in ["base_corpus.parquet"] + [f"pools/{n}.parquet" for n in types]:
            for row in tables[rel]:
                for m in row["messages"]:
                    yield m["content"]

    return build_tokenizer(texts(), vocab_size=VOCAB_SIZE)


def _token_counts(tok, conversations: list[list[dict[str, str]]]) -> list[int]:
    texts = tok.apply_chat_template(conversations, tokenize=False)
    return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]


def _stats(tables: dict[str, list[dict[str, Any]]], tok,
           types: dict[str, str] = OBJECTIVES) -> dict[str, Any]:
    stats: dict[str, Any] = {"tokenizer": {"vocab_size": len(tok)}}
    for split in SPLITS:
        stats[split] = {}
        for name in types:
            rows = tables[f"{split}/{name}.parquet"]
            metas = [json.loads(r["metadata"]) for r in rows]
            entry: dict[str, Any] = {"rows": len(rows)}
            counts = _token_counts(tok, [r["messages"] for r in rows])
            entry.update(tokens=sum(counts), tokens_max=max(counts),
                         tokens_mean=round(sum(counts) / len(counts), 1))
            if split in ("pools", "judge"):
                entry["prompts"] = len({r["prompt_id"] for r in rows})
                entry["slices"] = _hist(r["slice"] for r in rows)
                entry["scores"] = _hist(int(r["score"]) for r in rows)
                entry["valid"] = sum(r["valid"] for r in rows)
            else:
                entry["slices"] = _hist(m["slice"] for m in metas)
            entry["turns"] = _hist(sum(1 for m in r["messages"] if m["role"] == "user") for r in rows)
            if name == "boundary":
                entry["controls"] = sum(bool(m.get("control")) for m in metas)
            stats[split][name] = entry
    corpus = tables["base_corpus.parquet"]
    counts = _token_counts(tok, [r["messages"] for r in corpus])
    stats["base_corpus"] = {
        "conversations": len(corpus), "tokens": sum(counts), "tokens_max": max(counts),
        "tokens_mean": round(sum(counts) / len(counts), 1),
        "over_300_tokens": sum(c > 300 for c in counts),
        "kinds": _hist(json.loads(r["metadata"])["kind"] for r in corpus),
        "turns": _hist(sum(1 for m in r["messages"] if m["role"] == "user") for r in corpus),
    }
    return stats
