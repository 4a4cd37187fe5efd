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
(``features.token_sample_rate``), and a density is a share of all of a text's tokens. (It is what an SAE trained
here learns from: ``sparserm.steering.saes``, run first when a side names no SAE.)

Beside the map the build stores the per-triple densities G and D (``densities.safetensors``): the static
baseline of ``steer evaluate`` (the mean g) and the audit's selection counts read them.
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
from sparserm.steering.store import (DENSITIES, MANIFEST, MAP_FILE, STAGE, bundle_saes, map_key, save_densities,
                                     save_map, stored_key)

COUNTS = ("n_prompt", "n_chosen", "n_rejected")  # tokens per triple (the FLOP count of `steer evaluate` reads them)


class DensityPass:
    """Callable class for ``Dataset.map_batches``: the backbone (cut after the deepest side's block) and every
    side's SAE, loaded once per actor; each call returns one table row per triple, per side its density as the
    nonzeros of a dense row (``s<i>_idx``, ``s<i>_val``). ``steer build`` passes (input, output); ``steer layers``
    every candidate layer of both kinds, all read from the same forward."""

    def __init__(self, model_cfg: dict, cache_dir: str, sides: list[dict], max_batch_tokens: int, use_gpu: bool):
        from sparserm.model.backbone import load_backbone
        from sparserm.sae.autoencoder import SparseAutoencoder

        torch.set_num_threads(os.cpu_count() or 1)  # Ray sets OMP_NUM_THREADS to the actor's CPU reservation
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.sides = [SAESide(**s) for s in sides]
        layers = sorted({s.layer for s in self.sides})
        self.model_cfg = replace(build(ModelConfig, model_cfg), layer=layers[-1], extra_layers=tuple(layers[:-1]))
        self.backbone = load_backbone(self.model_cfg, cache_dir, device)
        folders = {s.folder for s in self.sides}
        self.saes = {f: SparseAutoencoder.load(f, device) for f in sorted(folders)}
        self.max_batch_tokens = max_batch_tokens

    def densities(self, group, texts, row_id: str) -> list[torch.Tensor]:
        """Per side: g [m] from the prompt tokens (input), or drho [m] from the responses' own tokens (output)."""
        n_prompt = len(group.prefix)
        lengths = [len(s) for s in group.suffixes]
        if n_prompt == 0 or min(lengths) == 0:
            what = "prompt" if n_prompt == 0 else ("chosen", "rejected")[lengths.index(0)] + " response"
            raise ValueError(f"steer build: row {row_id}: the {what} has no tokens within model.max_tokens="
                             f"{self.model_cfg.max_tokens} (raise it, or shorten the text)")
        out = []
        for s in self.sides:
            sae = self.saes[s.folder]
            if s.side == "input":
                out.append(activation_density(sae.encode(texts[0].states[s.layer][:n_prompt])))
            else:
                rho = [activation_density(sae.encode(t.states[s.layer][n_prompt:])) for t in texts]
                out.append(rho[0] - rho[1])
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from sparserm.fpo.reference_cache import _sparse
        from sparserm.model.forward import packed_states
        from sparserm.model.text import encode_group

        tok, m = self.backbone.tokenizer, self.model_cfg
        groups = [encode_group(tok, str(p), [str(c), str(r)], m.max_tokens, m.chat_template)
                  for p, c, r in zip(batch["prompt"], batch["chosen"], batch["rejected"])]
        states = packed_states(self.backbone, groups, share_prefix=True, max_batch_tokens=self.max_batch_tokens)
        names = [f"s{i}" for i in range(len(self.sides))]
        sparse = [f"{c}_{p}" for c in names for p in ("idx", "val")]
        cols: dict[str, list] = {k: [] for k in ("triple", *COUNTS, *sparse)}
        for i, (group, texts) in enumerate(zip(groups, states)):
            for c, d in zip(names, self.densities(group, texts, str(batch["row_id"][i]))):
                idx, val = _sparse(d)
                cols[f"{c}_idx"].append(idx)
                cols[f"{c}_val"].append(val)
            cols["triple"].append(int(batch["triple"][i]))
            for k, n in zip(COUNTS, (len(group.prefix), *(len(s) for s in group.suffixes))):
                cols[k].append(n)
        types = {"triple": pa.int64(), **{k: pa.int32() for k in COUNTS},
                 **{f"{c}_idx": pa.list_(pa.int32()) for c in names}, **{f"{c}_val": pa.list_(pa.float32())
                                                                          for c in names}}
        return pa.table({k: pa.array(v, type=types[k]) for k, v in cols.items()})


def density_pass(cfg: Config, triples: list[dict], sides: list[SAESide] | tuple[SAESide, ...],
                 progress: bool = True) -> tuple[list[torch.Tensor], pa.Table]:
    """(per side its densities [N, d_sae]: G for an input side, D for an output side; the pass's table ordered by
    triple) over ``triples``, by one Ray Data pass."""
    from sparserm.data.ray_dataset import actor_pass, collect_sorted
    from sparserm.fpo.reference_cache import SparseRows
    from sparserm.ray_train import ensure_ray

    ensure_ray(cfg.run.ray_address)
    s = cfg.steer
    items = [{"triple": i, "row_id": t["row_id"], "prompt": t["prompt"], "chosen": t["chosen"],
              "rejected": t["rejected"]} for i, t in enumerate(triples)]
    ds = actor_pass(items, DensityPass, {"model_cfg": to_dict(cfg.model), "cache_dir": str(cfg.run.cache_dir),
                                         "sides": [asdict(side) for side in sides],
                                         "max_batch_tokens": cfg.features.max_batch_tokens, "use_gpu": s.num_gpus > 0},
                    blocks=math.ceil(len(items) / s.batch_size), resources=s)
    table = collect_sorted(ds, "triple", len(items), "steer: density pass", progress, unit="triple")
    if table.column("triple").to_pylist() != list(range(len(items))):
        raise RuntimeError(f"steer build: the pass returned {table.num_rows} rows for {len(items)} triples")
    everyone = list(range(len(items)))
    dense = [SparseRows.from_arrow(table.column(f"s{i}_idx"), table.column(f"s{i}_val")).dense(everyone, side.d_sae)
             for i, side in enumerate(sides)]
    return dense, table


def build_map(cfg: Config, out_dir: str | Path, progress: bool = True) -> Path:
    """The steering map of ``cfg`` in ``out_dir``: reused when the folder holds one of the same key, refused
    (``StaleArtifactError`` naming the fields) when it holds another, else built by one pass."""
    from sparserm.data import write_rejects

    out_dir = Path(out_dir)
    sides = sae_sides(cfg, out_dir / "sae_pass")
    triples: Triples = load_triples(cfg)
    key = map_key(cfg, triples.rows, sides)
    if (out_dir / MANIFEST).is_file():
        check_key(stored_key(out_dir), key, f"steering map {out_dir}")
        if (out_dir / MAP_FILE).is_file() and (out_dir / DENSITIES).is_file():
            if progress:
                print(f"[steer build] map of the same key found, reused: {out_dir}", flush=True)
            return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    write_rejects(triples.rejects, out_dir / "rejects.jsonl")
    start = time.time()
    (G, D), table = density_pass(cfg, triples.rows, sides, progress)
    cmap = sparsify(conditional_difference_map(G, D), cfg.steer)
    save_map(out_dir, cmap)
    save_densities(out_dir, G, D)
    tokens = {k: int(np.asarray(table.column(k)).sum()) for k in COUNTS}
    bundled = bundle_saes(out_dir, sides)  # the folder is the whole map: it loads wherever it is copied or pulled
    write_manifest(out_dir, cfg, STAGE, inputs=triples.checksums, extra={"key": key, "data": triples.summary, "map": {
        "file": MAP_FILE, "layout": "csr over input latents", "m_in": cmap.m_in, "m_out": cmap.m_out,
        "nnz": cmap.nnz, "n_triples": len(triples.rows), "n_rejected": len(triples.rejects), "tokens": tokens,
        "input_sae": asdict(bundled[0]), "output_sae": asdict(bundled[1]), "seconds": round(time.time() - start, 2)}})
    return out_dir
