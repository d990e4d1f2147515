"""Golden count-and-hash tests: the default sandbox world and one dataset built from it.

"Bytes unchanged" is checked here rather than claimed in commit messages. Hashes are of the
*content* (rows as canonical JSON, the tokenizer's vocabulary and merges), not of parquet bytes,
so a pyarrow upgrade that encodes the same rows differently does not fail them; a change to what
the world says or what the builder selects does. When a change is intended, regenerate the
figures with `python tests/test_golden.py` and say why in the commit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

GOLDEN_WORLD = {  # file: [rows, sha256 of the rows as canonical JSON]
    "base_corpus.parquet": [6000, "b567e39c58c26ded1935b88ab8f9a11d82c388c0e3af7cbe4b58fd054ca1aabf"],
    "eval/boundary.parquet": [240, "b5bd58f014739e1abe1e9b04b9cf471930a4ae75ae55af2dc47f289ccba1d6f7"],
    "eval/instruction.parquet": [240, "30cb63a84460d5326c67b4c20dbe1416cf9ddaadf1bfeea96d1ea555ddb27a40"],
    "eval/safety.parquet": [240, "566220d8fb659a3fede2bad14a9dd915c80ebf56995d180ad9e2b3d4bced9d90"],
    "heldout/boundary.parquet": [240, "71ee693ae67245fe4614d27ca4370206570a037b028d441d6316e7b9582370a8"],
    "heldout/instruction.parquet": [240, "85b564f8ec33267c6402c6ce9c0f83c80d8113463749d61383008bba347d7f48"],
    "heldout/safety.parquet": [240, "75ec6d939aeaec92b4203ccec6e844f850d24ef4336c5e210dc9c66c162dfb7e"],
    "judge/boundary.parquet": [480, "8d96d517c225e3557ec8c8d7541d4d3bbcf5ae73deed671dc2207e9b38866beb"],
    "judge/instruction.parquet": [480, "9c499940bf70b6869c128e10cbea98d517da64f39ea9cdae6085db501bdcda87"],
    "judge/safety.parquet": [480, "d0172f307d9f16bccaf9c8018c3be8f55c0500e87f24388ced920416f7e0176c"],
    "pools/boundary.parquet": [3600, "7baaf8b9b0001823884257a03c6c434b7df098ec953d3b77da917a875cdd9f85"],
    "pools/instruction.parquet": [3600, "541010624d8f0b1ea8b83b41d9bf0284a864647d2d3ca2bc93a6c2361caf18fa"],
    "pools/safety.parquet": [3600, "45883d4f6fd28118a3ff1304f7570383f1e12d0522c31b9248917fd1c1db6ed8"],
}
GOLDEN_TOKENIZER = "f60766035d30542cc004e64d9188b7525027b631c3b7986b4c237fe8388afbc8"  # sha256 of [vocab, merges]
# rows, tokens, sha256 of (id, bucket, tokens) per selected row; measured identical on the
# builder before it was split into tools/dataset/ (commit 897dfae).
GOLDEN_DATASET = {"rows": 2482, "tokens": 299765, "sha256": "dcb88e33a50fe8619a641d73fc9daa9e95b1f69d8d9061df5d864da6ff5e47af"}


def table_digest(path: Path) -> tuple[int, str]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return len(rows), h.hexdigest()


def world_digests(root: Path) -> dict[str, list]:
    return {p.relative_to(root).as_posix(): list(table_digest(p))
            for p in sorted(root.rglob("*.parquet"))}


def tokenizer_digest(root: Path) -> str:
    tok = json.loads((root / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8"))
    model = tok["model"]
    return hashlib.sha256(json.dumps([model["vocab"], model["merges"]], sort_keys=True)
                          .encode()).hexdigest()


ACTION = {"mixture": {"safety": 0.4, "boundary": 0.4, "instruction": 0.2},
          "objectives": {"safety": {"bucket_weights": {"complexity_3": 0.3, "complexity_4": 0.4,
                                                       "complexity_5": 0.3},
                                    "focus": {"include": {"leak_types": ["step_leak"]}},
                                    "focus_ratio": 0.5},
                         "boundary": {"focus": {"exclude": {"friction": ["mid", "high"]}}}},
          "quality_threshold": 4.0, "method": "sft", "rationale": "golden"}


def dataset_digest(root: Path, cache_dir: Path) -> dict[str, object]:
    from mosaic.config import load_config
    from mosaic.tools.build_dataset import check_and_build
    from mosaic.tools.dataset.pools import prepare_from_config
    from mosaic.tools.validate_action import ActionContext
    from mosaic.training.models import load_tokenizer

    objectives = {name: {"pool": str(root / "pools" / f"{name}.parquet"),
                         "eval": str(root / "eval" / f"{name}.parquet"),
                         "heldout": str(root / "heldout" / f"{name}.parquet")}
                  for name in ("safety", "boundary", "instruction")}
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "sandbox.yaml", environ={},
                      overrides={"objectives": objectives, "world": {"data_dir": str(root)}})
    data = prepare_from_config(cfg, load_tokenizer(root / "tokenizer"),
                               cache_dir=cache_dir)
    ctx = ActionContext.from_config(cfg, data.prepared, eval_ids=data.eval_ids)
    outcome = check_and_build(json.dumps(ACTION), ctx, seed=1, dry_run=True)
    assert outcome.verdict.ok, outcome.verdict.problems
    t = outcome.table
    h = hashlib.sha256()
    for row in zip(t.column("id").to_pylist(), t.column("bucket").to_pylist(),
                   t.column("tokens").to_pylist()):
        h.update(json.dumps(row).encode() + b"\n")
    return {"rows": t.num_rows, "tokens": outcome.manifest.total_tokens, "sha256": h.hexdigest()}


@pytest.mark.slow
def test_the_default_sandbox_world_is_unchanged(sandbox_world):
    assert world_digests(sandbox_world.root) == GOLDEN_WORLD
    assert tokenizer_digest(sandbox_world.root) == GOLDEN_TOKENIZER


@pytest.mark.slow
def test_one_built_dataset_is_unchanged(sandbox_world, tmp_path):
    assert dataset_digest(sandbox_world.root, tmp_path) == GOLDEN_DATASET


if __name__ == "__main__":  # print the figures to paste above (after an intended change)
    import sys
    import tempfile

    root = Path(sys.argv[1] if len(sys.argv) > 1 else "data/sandbox")
    print("GOLDEN_WORLD =", json.dumps(world_digests(root), indent=4))
    print("GOLDEN_TOKENIZER =", json.dumps(tokenizer_digest(root)))
    with tempfile.TemporaryDirectory() as tmp:
        print("GOLDEN_DATASET =", json.dumps(dataset_digest(root, Path(tmp)), indent=4))
