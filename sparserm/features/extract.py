"""The one model pass: Ray Data streams preference pairs through actors that hold the truncated backbone.

Per text the actors compute the pooled residual of every configured layer and a seeded sample of per-token
residuals (the SAE's training data). Chosen and rejected share their prompt: it runs once, and several
pairs go through the model in one packed forward (``model.forward.packed_states``).

Each actor call writes its own Parquet shard (atomically: a temporary name, then a rename) and hands Ray
only a small receipt per pair. So the residuals never travel through the object store or a separate
writer task, the whole pass is one Ray Data execution (one actor start and model load), and a stopped
pass resumes from the pairs its finished shards hold. An actor killed mid-call is restarted and the call
redone (``sparserm.data.ray_dataset.actor_pass``); the shard it writes has the name the first try would have
given it (a digest of its row ids), so the cache still holds each pair once.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sparserm.config import FeaturesConfig, ModelConfig, build
from sparserm.features.cache import SHARD_NAME
from sparserm.storage import upload

SIDES = ("chosen", "rejected")


def _row_seed(row_id: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[:8], "little")


def _ragged(arrays: list[np.ndarray], dtype) -> pa.ListArray:
    """One list cell per array (each flattened), built from one flat buffer and its offsets."""
    sizes = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    flat = np.concatenate([a.reshape(-1) for a in arrays]).astype(dtype) if arrays else np.empty(0, dtype)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat))


def _fixed(matrix: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.astype(np.float32).reshape(-1)), matrix.shape[1])


def write_shard(columns: dict[str, list], out_dir: Path) -> Path:
    """Write one shard atomically; its name is a digest of the pairs it holds (a rerun overwrites, never
    duplicates)."""
    arrays = {}
    for k, v in columns.items():
        if k.startswith("pooled_"):
            arrays[k] = _fixed(np.stack(v))
        elif k.startswith("tokens_"):
            arrays[k] = _ragged(v, np.float32)
        elif k == "token_ids":
            arrays[k] = _ragged(v, np.int64)
        else:
            arrays[k] = pa.array(v)
    digest = hashlib.sha256("\0".join(columns["row_id"]).encode()).hexdigest()[:20]
    path = out_dir / SHARD_NAME.format(digest)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    pq.write_table(pa.table(arrays), tmp)
    os.replace(tmp, path)
    return path


class ResidualExtractor:
    """Callable class for ``Dataset.map_batches``: one backbone per actor, loaded once. Each call writes
    one shard into ``out_dir`` and returns one receipt row per pair (row id, tokens computed, the Ray node id
    of the actor that computed it)."""

    def __init__(self, model_cfg: dict, features_cfg: dict, cache_dir: str, seed: int, out_dir: str,
                 shard_home: tuple[str, str] | None = None):
        import ray

        from sparserm.model.backbone import load_backbone

        self.model_cfg = build(ModelConfig, model_cfg)
        self.cfg = build(FeaturesConfig, features_cfg)
        # Ray sets OMP_NUM_THREADS to the actor's CPU reservation; the model should use what the node has.
        torch.set_num_threads(self.cfg.torch_threads or os.cpu_count() or 1)
        self.backbone = load_backbone(self.model_cfg, cache_dir)
        self.seed = seed
        self.node_id = ray.get_runtime_context().get_node_id()
        self.shard_home = shard_home  # a cache on a storage URI: each shard is uploaded there once written
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def _states(self, groups):
        """TextStates of every text of every group: packed forwards within the token budget."""
        from sparserm.model.forward import packed_states

        return packed_states(self.backbone, groups, self.cfg.share_prefix, self.cfg.max_batch_tokens)

    def columns(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        """The shard's columns for a batch of pairs: one entry per text (chosen, then rejected)."""
        from sparserm.model.text import encode_group

        out: dict[str, list] = {k: [] for k in ("row_id", "prompt_id", "source", "split", "side", "text",
                                                "n_tokens", "n_computed", "token_ids")}
        layers = self.backbone.layers
        for layer in layers:
            out[f"pooled_{layer}"] = []
            out[f"tokens_{layer}"] = []
        groups = [encode_group(self.backbone.tokenizer, str(p), [str(c), str(r)], self.model_cfg.max_tokens,
                               self.model_cfg.chat_template)
                  for p, c, r in zip(batch["prompt"], batch["chosen"], batch["rejected"])]
        for i, (group, texts) in enumerate(zip(groups, self._states(groups))):
            row_id = str(batch["row_id"][i])
            rng = np.random.default_rng(_row_seed(row_id, self.seed))
            n_prefix = len(group.prefix)
            for side, text in zip(SIDES, texts):
                # Token sample: the shared prompt tokens are sampled once (with the chosen text).
                start = 0 if side == "chosen" else n_prefix
                positions = np.arange(start, len(text.token_ids))
                keep = positions[rng.random(len(positions)) < self.cfg.token_sample_rate]
                out["row_id"].append(row_id)
                out["prompt_id"].append(hashlib.sha256(str(batch["prompt"][i]).encode()).hexdigest()[:16])
                out["source"].append(str(batch["source"][i]))
                out["split"].append(str(batch["split"][i]))
                out["side"].append(side)
                out["text"].append(str(batch[side][i]))
                out["n_tokens"].append(len(text.token_ids))
                out["n_computed"].append(len(text.token_ids) - start if self.cfg.share_prefix else len(text.token_ids))
                out["token_ids"].append(np.asarray([text.token_ids[p] for p in keep], dtype=np.int64))
                for layer in layers:
                    out[f"pooled_{layer}"].append(text.pooled(layer, self.model_cfg.pooling).cpu().numpy())
                    out[f"tokens_{layer}"].append(text.states[layer][torch.as_tensor(keep, dtype=torch.long)]
                                                  .cpu().float().numpy())
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cols = self.columns(batch)
        path = write_shard(cols, self.out_dir)
        if self.shard_home:
            upload(self.shard_home, path)
        # texts come in (chosen, rejected) order, pair by pair
        computed = np.asarray(cols["n_computed"]).reshape(-1, 2).sum(1)
        return {"row_id": np.asarray(cols["row_id"][::2]), "n_computed": computed,
                "node_id": np.asarray([self.node_id] * len(computed))}


def extract_to_shards(rows: list[dict], out_dir: str, model_cfg: ModelConfig, features_cfg: FeaturesConfig,
                      cache_dir: str, seed: int, on_batch: Callable[[int, int], None] | None = None,
                      shard_home: tuple[str, str] | None = None) -> list[str]:
    """One Ray Data execution over ``rows`` (dicts with prompt/chosen/rejected/source/row_id/split), the
    actors writing Parquet shards into ``out_dir``. Rows are ordered by length so batches hold texts of
    similar size. ``on_batch(pairs, tokens_computed)`` is called in the driver as each batch finishes.
    Returns the Ray node ids of the actors that computed the rows (sorted; empty when there were none)."""
    from sparserm.data.ray_dataset import actor_pass

    if not rows:
        return []
    ordered = sorted(rows, key=lambda r: len(r["prompt"]) + len(r["chosen"]) + len(r["rejected"]))
    # One block per batch, each at most batch_size pairs, handed whole to an actor call (batch_size=None):
    # re-batching blocks of other sizes leaves remainder calls of a pair or two.
    ds = actor_pass(ordered, ResidualExtractor, {"model_cfg": asdict(model_cfg), "features_cfg": asdict(features_cfg),
                                                 "cache_dir": cache_dir, "seed": seed, "out_dir": out_dir,
                                                 "shard_home": shard_home},
                    blocks=math.ceil(len(ordered) / max(1, features_cfg.batch_size)), resources=features_cfg)
    nodes: set[str] = set()
    for receipt in ds.iter_batches(batch_format="numpy", batch_size=None):
        nodes.update(str(n) for n in receipt["node_id"])
        if on_batch is not None:
            on_batch(len(receipt["row_id"]), int(receipt["n_computed"].sum()))
    return sorted(nodes)
