"""FPO's offline reference (SPEC section 5): one Ray Data pass of the reference model over the pairs, written
once, so training holds no reference model.

Per pair: the summed response log-probs and response token counts of chosen and rejected (a_ref = sum /
count) and, per response, the SAE activations at layer L (residual after block L, before any final norm)
mean-pooled over the response's own tokens: exactly ``pair_forward(..., needs={"features"})``, the function
the trainer calls for the policy, on the ids of ``tokenize_pairs``. The reference is the base weights, or
base + a LoRA adapter folder (peft ``PeftModel.from_pretrained``), its parameters in the dtype the policy
trains in (DeepSpeed's cast: parameters only, buffers keep their loaded dtype).

Storage: EVERY nonzero of each pooled activation, (indices int32, values float32) sorted by value
descending, not the SPEC sketch's top-k. FPO's default index set topk(c_pi) ∪ topk(c_ref) needs c_ref at
the policy's top-k latents, which can be any latent: a top-k cache would read 0 where the reference is not
0. With every nonzero the cache is exact for both index sets and every k (topk(c_ref) is a row's first k
entries), so k is not in the key; the key records ``"stored": "all_nonzero"``. The price: a real SAE's
pooled row holds every latent any of its tokens fired (thousands of 16k), 8 bytes each.

``out_dir`` holds ``reference.parquet`` (pair, chosen_logp, rejected_logp (float64), chosen_tokens,
rejected_tokens, chosen_idx, chosen_val, rejected_idx, rejected_val; ordered by pair) and ``manifest.json``
{"key", "n_pairs", "d_sae", "seconds"}, written into a hidden sibling folder renamed into place at the end
(a killed pass leaves no half cache). A folder holding another key's cache is refused, never overwritten.

Batch composition: the pairs are cut, in order, into ceil(n / batch_size) forwards of near-equal size
(``forward_batches``: the split ``ray.data.from_items`` makes into that many blocks), one block per actor
call and per forward, so the numbers do not depend on how Ray schedules the blocks.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sparserm.align.objectives import PairStats
from sparserm.config import Config, ModelConfig, build, to_dict
from sparserm.manifest import StaleArtifactError, check_key, folder_hash, model_key, stable_hash, write_json

TABLE, MANIFEST = "reference.parquet", "manifest.json"
SIDES = ("chosen", "rejected")


def trainer_dtype(cfg: Config) -> str:
    """The dtype the policy's parameters train in: bf16 under ``use_bf16`` (the trainer's device is CUDA when
    its workers hold GPUs), else the dtype the model loads in (DeepSpeed casts nothing without bf16)."""
    from sparserm.align.trainer import use_bf16

    t = cfg.align.train
    return "bfloat16" if use_bf16(t, "cuda" if t.num_gpus > 0 else "cpu") else cfg.model.dtype


def cache_key(cfg: Config, pairs: list[dict], adapter: str | None, sae_dir: str, layer: int) -> dict:
    from sparserm.align.trainer import adapter_hash

    g = cfg.align.generate
    return {"reference": {"model": model_key(cfg.model), "adapter": adapter_hash(adapter)},
            "sae": folder_hash(sae_dir), "layer": int(layer), "pooling": "mean_over_response_tokens",
            "max_tokens": g.max_prompt_tokens + g.max_new_tokens, "dtype": trainer_dtype(cfg),
            "stored": "all_nonzero", "data": stable_hash([[p["prompt"], p["chosen"], p["rejected"]] for p in pairs])}


def forward_batches(n: int, batch_size: int) -> list[list[int]]:
    """Pair ids of each forward: ceil(n / batch_size) consecutive runs of near-equal size (the first ones one
    longer), as ``ray.data.from_items(..., override_num_blocks=len(result))`` splits the items."""
    k = math.ceil(n / batch_size)
    q, r = divmod(n, max(k, 1))
    return [list(range(i * q + min(i, r), (i + 1) * q + min(i + 1, r))) for i in range(k)]


def _sparse(row: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Every nonzero of a pooled activation: (indices int32, values float32), values descending (ties: index)."""
    nz = row.nonzero(as_tuple=True)[0]
    vals = row[nz]
    order = torch.sort(vals, descending=True, stable=True).indices
    return nz[order].cpu().numpy().astype(np.int32), vals[order].cpu().numpy().astype(np.float32)


class ReferencePass:
    """Callable class for ``Dataset.map_batches``: the reference model (+ adapter) and the SAE, loaded once
    per actor; each call (one block = one forward) returns the cache rows of its pairs as a pyarrow table."""

    def __init__(self, model_cfg: dict, cache_dir: str, adapter: str | None, sae_dir: str, layer: int,
                 max_tokens: int, dtype: str, use_gpu: bool):
        from sparserm.align.references import frozen_reference
        from sparserm.model.backbone import DTYPES
        from sparserm.sae.autoencoder import SparseAutoencoder

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model_cfg = build(ModelConfig, model_cfg)
        self.model, self.tok = frozen_reference(model_cfg, cache_dir, self.device, adapter, DTYPES[dtype])
        self.sae = SparseAutoencoder.load(sae_dir, self.device)
        self.layer, self.max_tokens = layer, max_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from sparserm.align.pair_forward import pair_forward, tokenize_pairs

        pairs = [{k: str(batch[k][i]) for k in ("prompt", "chosen", "rejected")} for i in range(len(batch["pair"]))]
        seqs = tokenize_pairs(self.tok, pairs, self.max_tokens, self.model_cfg.chat_template)
        with torch.no_grad():
            out = pair_forward(self.model, seqs, list(range(len(seqs))), self.tok.pad_token_id, self.device,
                               needs=frozenset({"features"}), sae=self.sae, layer=self.layer)
        cols: dict[str, list] = {"pair": [int(i) for i in batch["pair"]]}
        s = out.stats
        for side, lp, n, feats in zip(SIDES, (s.chosen, s.rejected), (s.chosen_tokens, s.rejected_tokens),
                                      (out.chosen_features, out.rejected_features)):
            cols[f"{side}_logp"] = lp.double().cpu().tolist()
            cols[f"{side}_tokens"] = [int(x) for x in n.cpu().tolist()]
            sparse = [_sparse(row) for row in feats.float()]
            cols[f"{side}_idx"] = [i for i, _ in sparse]
            cols[f"{side}_val"] = [v for _, v in sparse]
        cols["d_sae"] = [self.sae.d_sae] * len(seqs)
        return _table(cols)


def _table(cols: dict[str, list]) -> pa.Table:
    types = {"pair": pa.int64(), "d_sae": pa.int64(), **{f"{s}_logp": pa.float64() for s in SIDES},
             **{f"{s}_tokens": pa.int32() for s in SIDES}, **{f"{s}_idx": pa.list_(pa.int32()) for s in SIDES},
             **{f"{s}_val": pa.list_(pa.float32()) for s in SIDES}}
    return pa.table({k: pa.array(v, type=types[k]) for k, v in cols.items()})


def build_reference_cache(cfg: Config, pairs: list[dict], out_dir: str | Path, *, adapter: str | None = None,
                          sae_dir: str, layer: int, progress: bool = True) -> Path:
    """The reference cache of ``pairs`` in ``out_dir``: reused when it holds one of the same key, refused
    (:class:`StaleArtifactError` naming the fields) when it holds another, else computed by one Ray pass."""
    out_dir = Path(out_dir)
    key = cache_key(cfg, pairs, adapter, sae_dir, layer)
    if out_dir.exists() and any(out_dir.iterdir()):
        stored = json.loads((out_dir / MANIFEST).read_text()).get("key") if (out_dir / MANIFEST).is_file() else None
        check_key(stored, key, f"reference cache {out_dir}")
        load_reference_cache(out_dir, key)  # complete and readable
        return out_dir
    if not pairs:
        raise ValueError("build_reference_cache: no pairs")
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        start = time.time()
        table = _run_pass(cfg, pairs, key, adapter, sae_dir, layer, progress)
        d_sae = table.column("d_sae").unique().to_pylist()
        if len(d_sae) != 1 or table.column("pair").to_pylist() != list(range(len(pairs))):
            raise RuntimeError(f"reference pass returned an inconsistent table (d_sae {d_sae}, {len(table)} rows)")
        pq.write_table(table.drop(["d_sae"]), tmp / TABLE)
        write_json(tmp / MANIFEST, {"key": key, "n_pairs": len(pairs), "d_sae": d_sae[0],
                                    "seconds": round(time.time() - start, 3)})
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _run_pass(cfg: Config, pairs: list[dict], key: dict, adapter: str | None, sae_dir: str, layer: int,
              progress: bool) -> pa.Table:
    from sparserm.data.ray_dataset import actor_pass, collect_sorted
    from sparserm.ray_train import ensure_ray

    ensure_ray(cfg.run.ray_address)
    rc = cfg.align.reference_cache
    items = [{"pair": i, "prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}
             for i, p in enumerate(pairs)]
    ds = actor_pass(items, ReferencePass, {"model_cfg": to_dict(cfg.model), "cache_dir": str(cfg.run.cache_dir),
                                           "adapter": adapter, "sae_dir": str(sae_dir), "layer": int(layer),
                                           "max_tokens": key["max_tokens"], "dtype": key["dtype"],
                                           "use_gpu": rc.num_gpus > 0},
                    blocks=len(forward_batches(len(items), rc.batch_size)), resources=rc)  # one block, one forward
    return collect_sorted(ds, "pair", len(items), "fpo: reference cache", progress, unit="pair")


@dataclass
class SparseRows:
    """CSR rows: row i holds ``indices[offsets[i]:offsets[i+1]]`` and the same slice of ``values``."""

    offsets: np.ndarray  # int64 [n + 1]
    indices: np.ndarray  # int32
    values: np.ndarray  # float32

    @classmethod
    def from_arrow(cls, idx: pa.ChunkedArray, val: pa.ChunkedArray) -> "SparseRows":
        idx, val = idx.combine_chunks(), val.combine_chunks()
        off = np.asarray(idx.offsets, dtype=np.int64)
        if not np.array_equal(off, np.asarray(val.offsets)):
            raise StaleArtifactError("reference cache: index and value lists differ in length")
        base = off[0]
        return cls(off - base, np.asarray(idx.values)[base:off[-1]], np.asarray(val.values)[base:off[-1]])

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.indices[a:b], self.values[a:b]

    def dense(self, idx: list[int], d: int, device=None) -> torch.Tensor:
        idx = np.asarray(idx, dtype=np.int64)
        starts, lens = self.offsets[idx], self.offsets[idx + 1] - self.offsets[idx]
        rows = np.repeat(np.arange(len(idx)), lens)
        pos = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(starts, lens)
        out = torch.zeros(len(idx), d, dtype=torch.float32)
        out[torch.from_numpy(rows), torch.from_numpy(self.indices[pos].astype(np.int64))] = torch.from_numpy(
            self.values[pos])
        return out.to(device) if device is not None else out


@dataclass
class ReferenceCache:
    stats: PairStats  # every pair, float64
    rows: dict[str, SparseRows]  # "chosen" / "rejected"
    d_sae: int
    n_pairs: int
    key: dict

    def features(self, idx: list[int], side: str, device=None) -> torch.Tensor:
        """Dense pooled reference activations of the pairs ``idx``: float32 [len(idx), d_sae]."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        return self.rows[side].dense(idx, self.d_sae, device)


def load_reference_cache(out_dir: str | Path, expected_key: dict) -> ReferenceCache:
    out_dir = Path(out_dir)
    missing = [f for f in (MANIFEST, TABLE) if not (out_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"no complete reference cache at {out_dir} (missing {', '.join(missing)}); "
                                "build it with build_reference_cache")
    manifest = json.loads((out_dir / MANIFEST).read_text())
    check_key(manifest.get("key"), expected_key, f"reference cache {out_dir}")
    table = pq.read_table(out_dir / TABLE)
    n = int(manifest["n_pairs"])
    if table.num_rows != n or table.column("pair").to_pylist() != list(range(n)):
        raise StaleArtifactError(f"reference cache {out_dir} is incomplete: {table.num_rows} rows for {n} pairs")
    col = lambda name: torch.from_numpy(table.column(name).to_numpy().astype(np.float64))  # noqa: E731
    stats = PairStats(col("chosen_logp"), col("rejected_logp"), col("chosen_tokens"), col("rejected_tokens"))
    rows = {s: SparseRows.from_arrow(table.column(f"{s}_idx"), table.column(f"{s}_val")) for s in SIDES}
    return ReferenceCache(stats, rows, int(manifest["d_sae"]), n, manifest["key"])
