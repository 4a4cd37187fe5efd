"""``sparserm steer build``: one Ray Data pass over the triples computes the conditional-difference map.

Per triple the model runs once: the truncated backbone (cut after ``steer.output_layer``, both layers read from
the same forward) takes the prompt once and both responses in one packed row (``model.forward.packed_states``: a
tree mask, so each response sees the prompt and itself), exactly the pass ``sparserm features`` makes. The residual
after the input block at the prompt's tokens gives ``g(x)`` (input SAE), the residual after the output block at
each response's own tokens gives ``rho`` (output SAE). Actors (``steer.num_actors``, each ``steer.num_cpus`` /
``num_gpus``) hold the backbone and both SAEs; each call (``steer.batch_size`` triples, packed forwards within
``features.max_batch_tokens``) returns per triple g and drho as their nonzeros (sparse rows, as the FPO reference
cache stores pooled activations), and the driver forms A and sparsifies it (``conditional_map``).

The activation cache of ``sparserm features`` is not read: it keeps a sample of the tokens
(``features.token_sample_rate``), and a density is a share of all of a text's tokens.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from sparserm.config import Config, ModelConfig, build, replace, to_dict
from sparserm.manifest import check_key, write_manifest
from sparserm.steering.conditional_map import activation_density, conditional_difference_map, sparsify
from sparserm.steering.sources import SAESide, Triples, load_triples, sae_sides
from sparserm.steering.store import MANIFEST, MAP_FILE, STAGE, map_key, save_map, stored_key

COLUMNS = ("g", "drho")  # each stored as (<name>_idx, <name>_val): the nonzeros of one dense row


class DensityPass:
    """Callable class for ``Dataset.map_batches``: the backbone (cut after the output block) and both SAEs, loaded
    once per actor; each call returns one table row per triple."""

    def __init__(self, model_cfg: dict, cache_dir: str, input_sae: dict, output_sae: dict, max_batch_tokens: int,
                 use_gpu: bool):
        from sparserm.model.backbone import load_backbone
        from sparserm.sae.autoencoder import SparseAutoencoder

        torch.set_num_threads(os.cpu_count() or 1)  # Ray sets OMP_NUM_THREADS to the actor's CPU reservation
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.inp, self.out = SAESide(**input_sae), SAESide(**output_sae)
        self.model_cfg = replace(build(ModelConfig, model_cfg), layer=self.out.layer, extra_layers=(self.inp.layer,))
        self.backbone = load_backbone(self.model_cfg, cache_dir, device)
        self.saes = {s.side: SparseAutoencoder.load(s.folder, device) for s in (self.inp, self.out)}
        self.max_batch_tokens = max_batch_tokens

    def densities(self, group, texts, row_id: str) -> dict:
        """g [m_in] from the prompt tokens, drho [m_out] from the responses' own tokens, and the token counts."""
        n_prompt = len(group.prefix)
        lengths = [len(s) for s in group.suffixes]
        if n_prompt == 0 or min(lengths) == 0:
            what = "prompt" if n_prompt == 0 else ("chosen", "rejected")[lengths.index(0)] + " response"
            raise ValueError(f"steer build: row {row_id}: the {what} has no tokens within model.max_tokens="
                             f"{self.model_cfg.max_tokens} (raise it, or shorten the text)")
        g = activation_density(self.saes["input"].encode(texts[0].states[self.inp.layer][:n_prompt]))
        rho = [activation_density(self.saes["output"].encode(t.states[self.out.layer][n_prompt:])) for t in texts]
        return {"g": g, "drho": rho[0] - rho[1], "n_prompt": n_prompt, "n_chosen": lengths[0],
                "n_rejected": lengths[1]}

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from sparserm.fpo.reference_cache import _sparse
        from sparserm.model.forward import packed_states
        from sparserm.model.text import encode_group

        tok, m = self.backbone.tokenizer, self.model_cfg
        groups = [encode_group(tok, str(p), [str(c), str(r)], m.max_tokens, m.chat_template)
                  for p, c, r in zip(batch["prompt"], batch["chosen"], batch["rejected"])]
        states = packed_states(self.backbone, groups, share_prefix=True, max_batch_tokens=self.max_batch_tokens)
        cols: dict[str, list] = {k: [] for k in ("triple", "n_prompt", "n_chosen", "n_rejected",
                                                 *(f"{c}_{p}" for c in COLUMNS for p in ("idx", "val")))}
        for i, (group, texts) in enumerate(zip(groups, states)):
            d = self.densities(group, texts, str(batch["row_id"][i]))
            cols["triple"].append(int(batch["triple"][i]))
            for c in COLUMNS:
                idx, val = _sparse(d[c])
                cols[f"{c}_idx"].append(idx)
                cols[f"{c}_val"].append(val)
            for k in ("n_prompt", "n_chosen", "n_rejected"):
                cols[k].append(d[k])
        types = {"triple": pa.int64(), **{k: pa.int32() for k in ("n_prompt", "n_chosen", "n_rejected")},
                 **{f"{c}_idx": pa.list_(pa.int32()) for c in COLUMNS}, **{f"{c}_val": pa.list_(pa.float32())
                                                                           for c in COLUMNS}}
        return pa.table({k: pa.array(v, type=types[k]) for k, v in cols.items()})


def density_pass(cfg: Config, triples: list[dict], sides: tuple[SAESide, SAESide],
                 progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, pa.Table]:
    """(G [N, m_in], D [N, m_out], the pass's table ordered by triple) over ``triples``, by one Ray Data pass."""
    import ray

    from sparserm.fpo.reference_cache import SparseRows
    from sparserm.reward.train_head import ensure_ray

    ensure_ray(cfg.run.ray_address)
    s = cfg.steer
    items = [{"triple": i, "row_id": t["row_id"], "prompt": t["prompt"], "chosen": t["chosen"],
              "rejected": t["rejected"]} for i, t in enumerate(triples)]
    ds = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / s.batch_size))
    ds = ds.map_batches(
        DensityPass,
        fn_constructor_kwargs={"model_cfg": to_dict(cfg.model), "cache_dir": str(cfg.run.cache_dir),
                               "input_sae": asdict(sides[0]), "output_sae": asdict(sides[1]),
                               "max_batch_tokens": cfg.features.max_batch_tokens, "use_gpu": s.num_gpus > 0},
        batch_size=None,  # one block per call
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=s.num_actors),
        num_cpus=s.num_cpus,
        num_gpus=s.num_gpus or None,
    )
    tables, done = [], 0
    for t in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        tables.append(t)
        done += len(t)
        if progress:
            print(f"[steer build] {done}/{len(items)} triples", flush=True)
    table = pa.concat_tables(tables).sort_by("triple")
    if table.column("triple").to_pylist() != list(range(len(items))):
        raise RuntimeError(f"steer build: the pass returned {table.num_rows} rows for {len(items)} triples")
    everyone = list(range(len(items)))
    dense = [SparseRows.from_arrow(table.column(f"{c}_idx"), table.column(f"{c}_val")).dense(everyone, side.d_sae)
             for c, side in zip(COLUMNS, sides)]
    return dense[0], dense[1], table


def build_map(cfg: Config, out_dir: str | Path, progress: bool = True) -> Path:
    """The steering map of ``cfg`` in ``out_dir``: reused when the folder holds one of the same key, refused
    (``StaleArtifactError`` naming the fields) when it holds another, else built by one pass."""
    from sparserm.data import write_rejects

    out_dir = Path(out_dir)
    sides = sae_sides(cfg)
    triples: Triples = load_triples(cfg)
    key = map_key(cfg, triples.rows, sides)
    if (out_dir / MANIFEST).is_file():
        check_key(stored_key(out_dir), key, f"steering map {out_dir}")
        if (out_dir / MAP_FILE).is_file():
            if progress:
                print(f"[steer build] map of the same key found, reused: {out_dir}", flush=True)
            return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    write_rejects(triples.rejects, out_dir / "rejects.jsonl")
    start = time.time()
    G, D, table = density_pass(cfg, triples.rows, sides, progress)
    cmap = sparsify(conditional_difference_map(G, D), cfg.steer)
    save_map(out_dir, cmap)
    tokens = {k: int(np.asarray(table.column(k)).sum()) for k in ("n_prompt", "n_chosen", "n_rejected")}
    write_manifest(out_dir, cfg, STAGE, inputs=triples.checksums, extra={"key": key, "data": triples.summary, "map": {
        "file": MAP_FILE, "layout": "csr over input latents", "m_in": cmap.m_in, "m_out": cmap.m_out,
        "nnz": cmap.nnz, "n_triples": len(triples.rows), "n_rejected": len(triples.rejects), "tokens": tokens,
        "input_sae": asdict(sides[0]), "output_sae": asdict(sides[1]), "seconds": round(time.time() - start, 2)}})
    return out_dir
