"""The activation cache: Parquet shards of pooled residuals and sampled token residuals, one folder per
key (a hash of model, layers, pooling, token budget, sampling and the data checksums). Shards are written
chunk by chunk, each marked done, so a stopped pass resumes at the first unfinished chunk; the cache is
trusted only once ``complete.json`` exists.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from sparserm.manifest import write_json

META_COLUMNS = ("row_id", "prompt_id", "source", "split", "side", "text", "n_tokens", "n_computed")


@dataclass
class PooledTable:
    """Pooled states of every text, aligned with their metadata (one entry per text)."""

    meta: dict[str, np.ndarray]
    states: torch.Tensor  # [N, d]

    def select(self, mask: np.ndarray) -> "PooledTable":
        return PooledTable({k: v[mask] for k, v in self.meta.items()}, self.states[torch.as_tensor(mask)])

    def pair_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(index of each pair's chosen text, index of its rejected text), pairs in row-id order."""
        chosen = {r: i for i, (r, s) in enumerate(zip(self.meta["row_id"], self.meta["side"])) if s == "chosen"}
        rejected = {r: i for i, (r, s) in enumerate(zip(self.meta["row_id"], self.meta["side"])) if s == "rejected"}
        ids = sorted(set(chosen) & set(rejected))
        return np.array([chosen[r] for r in ids], dtype=np.int64), np.array([rejected[r] for r in ids], dtype=np.int64)

    def pairs(self) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """(row_ids, chosen states, rejected states), matched by row id."""
        iw, il = self.pair_index()
        return self.meta["row_id"][iw], self.states[torch.as_tensor(iw)], self.states[torch.as_tensor(il)]


class ActivationCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- writing ---------------------------------------------------------------------------------
    def chunk_dir(self, i: int) -> Path:
        return self.root / "shards" / f"chunk-{i:05d}"

    def chunk_done(self, i: int) -> bool:
        return (self.chunk_dir(i) / "_DONE").is_file()

    def mark_chunk_done(self, i: int, n_pairs: int) -> None:
        (self.chunk_dir(i) / "_DONE").write_text(json.dumps({"n_pairs": n_pairs}))

    def mark_complete(self, summary: dict) -> None:
        write_json(self.root / "complete.json", summary)

    @property
    def is_complete(self) -> bool:
        return (self.root / "complete.json").is_file()

    @property
    def summary(self) -> dict:
        return json.loads((self.root / "complete.json").read_text())

    # -- reading ---------------------------------------------------------------------------------
    def files(self) -> list[Path]:
        files = sorted(p for d in sorted((self.root / "shards").glob("chunk-*")) if (d / "_DONE").is_file()
                       for p in d.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"activation cache {self.root} holds no finished shards")
        return files

    def read_pooled(self, layer: int) -> PooledTable:
        import ray.data  # noqa: F401  (registers the tensor extension types used in the shards)

        meta: dict[str, list] = {k: [] for k in META_COLUMNS}
        states = []
        for f in self.files():
            table = pq.read_table(f, columns=[*META_COLUMNS, f"pooled_{layer}"])
            for k in META_COLUMNS:
                meta[k].append(table.column(k).to_numpy(zero_copy_only=False))
            states.append(_to_matrix(table.column(f"pooled_{layer}")))
        return PooledTable({k: np.concatenate(v) for k, v in meta.items()}, torch.from_numpy(np.concatenate(states)))

    def read_tokens(self, layer: int, d_model: int, limit: int | None = None, split: str | None = "train",
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(token residuals [n, d], token ids [n]) sampled during the pass; ``split`` keeps tokens of that
        split's texts only (so an SAE never sees eval texts); ``limit`` draws a seeded subset."""
        import ray.data  # noqa: F401

        acts, ids = [], []
        for f in self.files():
            table = pq.read_table(f, columns=["split", "token_ids", f"tokens_{layer}"])
            keep = np.ones(table.num_rows, dtype=bool) if split is None else \
                table.column("split").to_numpy(zero_copy_only=False) == split
            flat = _ragged_to_list(table.column(f"tokens_{layer}"))
            tid = _ragged_to_list(table.column("token_ids"))
            for k, a, t in zip(keep, flat, tid):
                if k and len(t):
                    acts.append(np.asarray(a, dtype=np.float32).reshape(-1, d_model))
                    ids.append(np.asarray(t, dtype=np.int64))
        x = torch.from_numpy(np.concatenate(acts)) if acts else torch.empty(0, d_model)
        t = torch.from_numpy(np.concatenate(ids)) if ids else torch.empty(0, dtype=torch.long)
        if limit is not None and len(x) > limit:
            pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
            x, t = x[pick], t[pick]
        return x, t


def _to_matrix(column) -> np.ndarray:
    chunks = [c.to_numpy() if hasattr(c, "to_numpy") else np.asarray(c) for c in column.chunks]
    return np.concatenate([np.stack(list(c)) if c.dtype == object else c for c in chunks]).astype(np.float32)


def _ragged_to_list(column) -> list:
    out = []
    for chunk in column.chunks:
        arr = chunk.to_numpy(zero_copy_only=False) if hasattr(chunk, "to_numpy") else chunk.to_pylist()
        out.extend(list(arr))
    return out
