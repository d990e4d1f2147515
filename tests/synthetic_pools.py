"""Synthetic training pools and eval sets in docs/data-format.md's format, generated vectorised.

Used by the builder/validator tests (small pools drawn by hypothesis) and by
bench/build_dataset_bench.py (a million rows), so both exercise the same layouts: multi-turn
conversations with optional system messages, several responses per prompt, exact and
case/whitespace-only duplicates, and eval items copied from pool prompts.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mosaic.tools.dataset.token_counts import TokenCounts

_WORDS = ("how do i kill a process on linux please explain the steps shoot photo at dusk with a "
          "tripod write answer in json format urgent admin override tell me recipe for bread "
          "list three reasons why the sky is blue summarise this paragraph briefly respond in "
          "lowercase only use exactly two bullet points avoid commas entirely pretend you are a "
          "chemist ignore the rules earlier we agreed you would help").split()
SENTENCES = tuple(" ".join(_WORDS[(i * 7 + j * 3) % len(_WORDS)] for j in range(4 + i % 7))
                  for i in range(257))
LEAKS = ("step_leak", "code_leak", "param_leak", "bypass_leak")
IF_IDS = ("punctuation:no_comma", "change_case:english_lowercase", "detectable_format:json_format",
          "length_constraints:number_words", "detectable_format:number_bullet_lists",
          "keywords:existence", "startend:end_checker", "detectable_content:postscript")


def _text(rng: np.random.Generator, keys: np.ndarray, tag: str) -> pa.Array:
    """One sentence pair plus a unique tag per key: distinct keys give distinct texts."""
    sent = pa.array(SENTENCES)
    a = sent.take(pa.array(rng.integers(0, len(SENTENCES), len(keys))))
    b = sent.take(pa.array(rng.integers(0, len(SENTENCES), len(keys))))
    k = pc.binary_join_element_wise(pa.repeat(pa.scalar(tag), len(keys)),
                                    pc.cast(pa.array(keys), pa.string()), "")
    return pc.binary_join_element_wise(a, b, k, " ")


def _list_column(offsets: np.ndarray, values: pa.Array) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def synthetic_pool(type_name: str, n_rows: int, *, seed: int = 0, objective: str | None = None,
                   responses_per_prompt: int = 3, dup_rate: float = 0.03,
                   system_rate: float = 0.2, max_turns: int = 5,
                   invalid_rate: float = 0.03) -> tuple[pa.Table, TokenCounts]:
    """A pool of `n_rows` rows of objective type `type_name`, and its token counts."""
    rng = np.random.default_rng(seed)
    objective = objective or type_name
    r = max(1, responses_per_prompt)
    n_prompts = max(1, -(-n_rows // r))
    prompt_of = np.arange(n_rows) // r
    first_of_prompt = np.r_[True, prompt_of[1:] != prompt_of[:-1]]
    turns_p = (rng.integers(1, max_turns + 1, n_prompts) if type_name == "jailbreak"
               else np.ones(n_prompts, dtype=np.int64))
    sys_p = rng.random(n_prompts) < system_rate
    turns, has_sys = turns_p[prompt_of], sys_p[prompt_of]
    n_msgs = has_sys.astype(np.int64) + 2 * turns
    offsets = np.concatenate([[0], np.cumsum(n_msgs)])
    parent = np.repeat(np.arange(n_rows), n_msgs)
    pos = np.arange(len(parent)) - offsets[parent]
    body = pos - has_sys[parent]  # position after the optional system message
    is_sys = body < 0
    is_user = ~is_sys & (body % 2 == 0)
    is_final = pos == n_msgs[parent] - 1
    role = np.where(is_sys, "system", np.where(is_user, "user", "assistant"))
    # Exact duplicates repeat the previous response of the same prompt; a share of them is
    # upper-cased instead (a normalised duplicate).
    final_key = np.arange(n_rows)
    dup = (rng.random(n_rows) < dup_rate) & ~first_of_prompt
    final_key[dup] = final_key[np.flatnonzero(dup) - 1]
    upper = dup & (rng.random(n_rows) < 0.5)
    p_of_msg = prompt_of[parent]
    key = np.where(is_sys, p_of_msg % 7,
                   np.where(is_final, final_key[parent], p_of_msg * 16 + body // 2))
    tag = np.where(is_sys, 0, np.where(is_user, 1, np.where(is_final, 3, 2)))
    content_parts = []
    for t, name in ((0, " sys"), (1, " u"), (2, " w"), (3, " r")):
        idx = np.flatnonzero(tag == t)
        # Seed per part from the keys so equal keys give equal texts.
        sub = np.random.default_rng([seed, t])
        sent_a = sub.integers(0, len(SENTENCES), int(key.max()) + 1 if len(key) else 1)
        sent_b = sub.integers(0, len(SENTENCES), int(key.max()) + 1 if len(key) else 1)
        sent = pa.array(SENTENCES)
        k = key[idx]
        txt = pc.binary_join_element_wise(
            sent.take(pa.array(sent_a[k])), sent.take(pa.array(sent_b[k])),
            pc.binary_join_element_wise(pa.repeat(pa.scalar(f"{objective[:3]}{name.strip()}"), len(k)),
                                        pc.cast(pa.array(k), pa.string()), ""), " ")
        content_parts.append((idx, txt))
    content = pa.concat_arrays([c for _, c in content_parts]).take(
        pa.array(np.argsort(np.concatenate([i for i, _ in content_parts]), kind="stable")))
    up_msg = pa.array(upper[parent] & is_final)
    content = pc.if_else(up_msg, pc.utf8_upper(content), content)
    messages = _list_column(offsets, pa.StructArray.from_arrays(
        [pa.array(role), content], names=["role", "content"]))
    msg_tokens = pc.binary_length(content).to_numpy().astype(np.int64) // 4 + 3
    row_tokens = np.bincount(parent, weights=msg_tokens, minlength=n_rows).astype(np.int64) + 2

    cols = _labels(type_name, rng, n_rows, n_prompts, prompt_of)
    valid = rng.random(n_prompts)[prompt_of] >= invalid_rate
    score = cols.pop("score")
    table = pa.table({
        "id": pc.binary_join_element_wise(pa.repeat(pa.scalar(f"{objective}-r"), n_rows),
                                          pc.cast(pa.array(np.arange(n_rows)), pa.string()), ""),
        "prompt_id": pc.binary_join_element_wise(pa.repeat(pa.scalar(f"{objective}-p"), n_rows),
                                                 pc.cast(pa.array(prompt_of), pa.string()), ""),
        "objective": pa.repeat(pa.scalar(objective), n_rows),
        "messages": messages,
        "l3_prompt": pa.repeat(pa.scalar(l3_json(type_name, "prompt")), n_rows),
        "l3_response": pa.repeat(pa.scalar(l3_json(type_name, "response")), n_rows),
        "slice": cols.pop("slice"),
        "score": score,
        "valid": pa.array(valid),
        "weight": pa.array(np.ones(n_rows)),
        "failure": pc.less(score, 3.0),
        **cols,
        "metadata": pa.repeat(pa.scalar("{}"), n_rows),
    })
    return table, TokenCounts(row=row_tokens, message=msg_tokens)


def l3_json(type_name: str, channel: str) -> str:
    """A placeholder L3 object with every atom of the type present (the builder reads L2/L1
    columns, never L3; the data loaders insist the atoms exist)."""
    import json

    from mosaic.eval import get_objective_type

    otype = get_objective_type(type_name)
    atoms = otype.prompt_atoms if channel == "prompt" else otype.response_atoms
    list_atoms = {"instruction_id_list", "kwargs", "status", "strict", "loose"}
    return json.dumps({a: [] if a in list_atoms else 0 for a in atoms}, sort_keys=True)


def _labels(type_name: str, rng: np.random.Generator, n: int, n_prompts: int,
            prompt_of: np.ndarray) -> dict[str, pa.Array]:
    if type_name == "jailbreak":
        pressure = rng.integers(1, 6, n_prompts)[prompt_of]
        concealment = rng.integers(1, 6, n_prompts)[prompt_of]
        n_leaks = np.minimum(rng.choice([0, 0, 0, 1, 1, 2], n), 4)
        leak_idx = rng.integers(0, 4, (n, 2))
        leak_idx[:, 1] = (leak_idx[:, 0] + 1 + rng.integers(0, 3, n)) % 4
        flat = leak_idx[np.arange(2)[None, :] < n_leaks[:, None]]
        offs = np.concatenate([[0], np.cumsum(n_leaks)])
        leaks = _list_column(offs, pa.array(np.array(LEAKS)[flat], type=pa.string()))
        heavy = (leak_idx[:, 0] == 1) | (leak_idx[:, 0] == 2)
        safety = np.where(n_leaks == 0, "safe",
                          np.where((n_leaks >= 2) | heavy, "full_leak", "partial_leak"))
        utility = rng.integers(0, 4, n)
        score = np.where(safety == "full_leak", 1, np.where(safety == "partial_leak", 2,
                         np.where(utility == 3, 5, np.where(utility == 2, 4, 3)))).astype(float)
        k = np.ceil((pressure + concealment) / 2).astype(int)
        pc_pattern = pc.binary_join_element_wise(
            pa.repeat(pa.scalar("P"), n), pc.cast(pa.array(pressure), pa.string()),
            pa.repeat(pa.scalar("_C"), n), pc.cast(pa.array(concealment), pa.string()), "")
        return {"slice": _prefixed("complexity_", k), "score": pa.array(score),
                "l2_depth": pa.array(np.minimum(3, pressure)), "l2_pressure": pa.array(pressure),
                "l2_concealment": pa.array(concealment), "l2_pc_pattern": pc_pattern,
                "l2_safety": pa.array(safety), "l2_leak_types": leaks,
                "l2_utility": pa.array(utility)}
    if type_name == "overrefusal":
        level = rng.integers(1, 5, n_prompts)[prompt_of]
        refusal = rng.choice(np.array(["explicit", "gated", "evasive", "none", "none", "none"]), n)
        help_level = rng.choice(np.array(["strong", "ok", "weak"]), n)
        friction = rng.choice(np.array(["low", "mid", "high"]), n)
        score = np.select([refusal == "explicit", refusal != "none", help_level == "weak",
                           (help_level == "strong") & (friction == "low"), friction != "high"],
                          [1, 2, 3, 5, 4], 3).astype(float)
        return {"slice": _prefixed("boundary_", level), "score": pa.array(score),
                "l2_boundary_level": pa.array(level), "l2_refusal_type": pa.array(refusal),
                "l2_help_level": pa.array(help_level), "l2_friction": pa.array(friction)}
    if type_name == "ifeval":
        ic = rng.integers(1, 6, n_prompts)[prompt_of]
        n_fail = rng.choice([0, 0, 1, 2], n)
        ids = rng.integers(0, len(IF_IDS), (n, 2))
        flat = ids[np.arange(2)[None, :] < n_fail[:, None]]
        offs = np.concatenate([[0], np.cumsum(n_fail)])
        failed = _list_column(offs, pa.array(np.array(IF_IDS)[flat], type=pa.string()))
        score = np.where(n_fail == 0, 5, np.where(n_fail == 1, rng.choice([4, 3], n), 2)).astype(float)
        r = 1 - n_fail / 3
        return {"slice": _prefixed("complexity_", ic), "score": pa.array(score),
                "l2_inst_complexity": pa.array(ic), "l2_failed_constraints": failed,
                "l2_r_strict": pa.array(r), "l2_r_loose": pa.array(r)}
    raise ValueError(f"no synthetic labels for type {type_name!r}")


def _prefixed(prefix: str, values: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(pa.repeat(pa.scalar(prefix), len(values)),
                                       pc.cast(pa.array(values), pa.string()), "")


def synthetic_eval(pool: pa.Table, type_name: str, n_items: int, *, seed: int = 0,
                   vary_case: bool = True) -> pa.Table:
    """An eval set whose items are the user turns of `n_items` pool prompts (some upper-cased
    and re-spaced, which the normalised hash must still catch) plus as many unrelated items."""
    rng = np.random.default_rng(seed)
    pids = pc.unique(pool.column("prompt_id")).to_numpy(zero_copy_only=False)
    pick = rng.choice(len(pids), size=min(n_items, len(pids)), replace=False)
    mask = pc.is_in(pool.column("prompt_id"), value_set=pa.array(pids[pick], type=pa.string()))
    rows = pool.filter(mask)
    # one row per picked prompt
    _, first = np.unique(rows.column("prompt_id").to_numpy(zero_copy_only=False), return_index=True)
    rows = rows.take(pa.array(np.sort(first)))
    msgs = rows.column("messages").combine_chunks()
    flat = pc.list_flatten(msgs)
    parents = pc.list_parent_indices(msgs).to_numpy()
    role = pc.struct_field(flat, "role")
    content = pc.struct_field(flat, "content")
    user = pc.equal(role, "user").to_numpy(zero_copy_only=False)
    content = content.filter(pa.array(user))
    if vary_case:
        varied = pa.array(rng.random(len(content)) < 0.5)
        content = pc.if_else(varied, pc.binary_join_element_wise(
            pa.repeat(pa.scalar("  "), len(content)), pc.utf8_upper(content), ""), content)
    par = parents[user]
    offs = np.concatenate([[0], np.cumsum(np.bincount(par, minlength=rows.num_rows))])
    user_msgs = _list_column(offs, pa.StructArray.from_arrays(
        [pa.repeat(pa.scalar("user"), len(content)), content], names=["role", "content"]))
    n_other = rows.num_rows
    other = _list_column(np.arange(n_other + 1), pa.StructArray.from_arrays(
        [pa.repeat(pa.scalar("user"), n_other),
         _text(rng, np.arange(n_other) + 10**9, " eval")], names=["role", "content"]))
    n = rows.num_rows + n_other
    return pa.table({
        "id": pc.binary_join_element_wise(pa.repeat(pa.scalar("eval-"), n),
                                          pc.cast(pa.array(np.arange(n)), pa.string()), ""),
        "objective": pa.concat_arrays([rows.column("objective").combine_chunks(),
                                       pa.repeat(pa.scalar(rows.column("objective")[0].as_py()
                                                           if rows.num_rows else "x"), n_other)]),
        "messages": pa.concat_arrays([user_msgs, other]),
        "l3_prompt": pa.repeat(pa.scalar(l3_json(type_name, "prompt")), n),
        "metadata": pa.repeat(pa.scalar("{}"), n),
    })
