"""The activation cache: Parquet shards of pooled residuals and sampled token residuals, one folder per
key (a hash of model, layers, pooling, token budget, sampling and the data checksums). Every shard is
written whole under its final name (``shards/part-*.parquet``), so the pairs the finished shards hold are
done and a stopped pass resumes with the rest; the cache is trusted only once ``complete.json`` exists.
Caches written before that layout (``shards/chunk-*/`` folders marked ``_DONE``) are still read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sparserm.manifest import write_json

SHARD_NAME = "part-{}.parquet"  # "{}": a digest of the shard's row ids; written by features.extract.write_shard
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


COMPLETE_FILE = "complete.json"  # written last: the cache holds every pair


class ActivationCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- writing ---------------------------------------------------------------------------------
    @property
    def shard_dir(self) -> Path:
        return self.root / "shards"

    def done_row_ids(self) -> set[str]:
        """Row ids of the pairs the finished shards hold (both texts of a pair are in one shard)."""
        return {r for f in self._shards() for r in pq.read_table(f, columns=["row_id"]).column(0).to_pylist()}

    def mark_complete(self, summary: dict) -> None:
        write_json(self.root / COMPLETE_FILE, summary)

    @property
    def is_complete(self) -> bool:
        return (self.root / COMPLETE_FILE).is_file()

    @property
    def summary(self) -> dict:
        return json.loads((self.root / COMPLETE_FILE).read_text())

    # -- reading ---------------------------------------------------------------------------------
    def _shards(self) -> list[Path]:
        legacy = [p for d in sorted(self.shard_dir.glob("chunk-*")) if (d / "_DONE").is_file()
                  for p in sorted(d.glob("*.parquet"))]
        return legacy + sorted(self.shard_dir.glob(SHARD_NAME.format("*")))

    def files(self) -> list[Path]:
        files = self._shards()
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
    parts = []
    for c in column.chunks:
        if pa.types.is_fixed_size_list(c.type):
            parts.append(c.flatten().to_numpy().reshape(len(c), c.type.list_size))
        else:  # Ray's tensor extension type (caches written before the shard layout)
            arr = c.to_numpy()
            parts.append(np.stack(list(arr)) if arr.dtype == object else arr)
    return np.concatenate(parts).astype(np.float32)


def _ragged_to_list(column) -> list:
    out = []
    for chunk in column.chunks:
        arr = chunk.to_numpy(zero_copy_only=False) if hasattr(chunk, "to_numpy") else chunk.to_pylist()
        out.extend(list(arr))
    return out
