"""The reward stage's pair sets, from a pooled table built by hand."""
import numpy as np
import torch

from sparserm.features.cache import PooledTable
from sparserm.reward.prepare import pair_sets


def _table(rows):
    meta = {k: np.array([r[k] for r in rows], dtype=str) for k in ("row_id", "prompt_id", "source", "split", "side")}
    meta["n_tokens"] = np.array([r["n_tokens"] for r in rows], dtype=np.int64)
    return PooledTable(meta, torch.arange(len(rows) * 4, dtype=torch.float32).reshape(len(rows), 4))


def test_pair_sets_split_by_prompt_and_an_empty_table_gives_empty_sets():
    rows = [dict(row_id=f"r{i}", prompt_id=f"p{i}", source="s", split="train" if i < 8 else "eval", side=side,
                 n_tokens=3 + i) for i in range(10) for side in ("chosen", "rejected")]
    train, val, held = pair_sets(_table(rows), 0.3, "salt")
    assert len(train) + len(val) == 8 and len(held) == 2 and len(val) > 0
    assert not set(train.prompt_id) & set(val.prompt_id)
    # no complete pair (only a chosen text): three empty sets, not a TypeError from a float mask
    lone = [dict(row_id="a", prompt_id="p", source="s", split="train", side="chosen", n_tokens=3)]
    assert [len(s) for s in pair_sets(_table(lone), 0.15, "salt")] == [0, 0, 0]
