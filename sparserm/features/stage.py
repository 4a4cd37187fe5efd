"""Stage ``features``: preference files -> one truncated model pass -> the activation cache.

The cache key covers everything that changes what the pass writes, so a second run with a complete
cache skips the model entirely, and a stopped run resumes with the pairs its finished shards do not hold.
"""
from __future__ import annotations

import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sparserm.progress import progress_bar

from sparserm.config import Config
from sparserm.data import is_eval, load_pairs, write_rejects
from sparserm.features.cache import COMPLETE_FILE, ActivationCache
from sparserm.manifest import input_checksum, stable_hash, write_json
from sparserm.storage import local_dir, pull, push, shard_home


@dataclass
class PreparedData:
    rows: list[dict]  # valid pairs with a "split" field (train | eval)
    rejects: list[dict]
    summary: dict  # per source: n_read, n_pairs, n_rejected, reasons
    checksums: dict[str, str]


def prepare_data(cfg: Config) -> PreparedData:
    rows, rejects, summary, checksums = [], [], {}, {}
    for src in cfg.data.sources:
        result = load_pairs(src.path, src.format, max_pairs=src.max_pairs, split=src.split,
                            max_per_prompt=src.max_per_prompt)
        for row in result.rows:
            row["split"] = "eval" if is_eval(row["prompt"], cfg.data.eval_fraction, cfg.data.split_salt) else "train"
        rows.extend(result.rows)
        rejects.extend(result.rejects)
        checksums[src.path] = input_checksum(src.path)
        summary[src.path] = {"n_read": result.n_read, "n_pairs": len(result.rows), "n_rejected": len(result.rejects),
                             "reasons": result.reason_counts(),
                             "n_train": sum(r["split"] == "train" for r in result.rows),
                             "n_eval": sum(r["split"] == "eval" for r in result.rows)}
    return PreparedData(rows, rejects, summary, checksums)


def cache_key(cfg: Config, checksums: dict[str, str]) -> str:
    from sparserm.model.text import ENCODING_VERSION

    m, f, d = cfg.model, cfg.features, cfg.data
    return stable_hash({
        "model": [m.name, m.gguf_file, m.revision, m.dtype, list(m.layers), m.pooling, m.max_tokens, m.chat_template],
        "encoding": ENCODING_VERSION,
        # max_per_prompt joins the key only when set, so caches made before it existed stay valid
        "data": [[s.path, s.format, s.max_pairs, s.split, checksums[s.path]]
                 + ([s.max_per_prompt] if s.max_per_prompt else []) for s in d.sources],
        "split": [d.eval_fraction, d.split_salt],
        "sample": [f.token_sample_rate, cfg.run.seed],
    })


def cache_root(cfg: Config, checksums: dict[str, str]) -> Path:
    return local_dir(cfg.run.cache_dir) / "activations" / cache_key(cfg, checksums)


def drop_partial_shards(cache: ActivationCache) -> None:
    """Remove the half-written shards (``*.tmp``, never read) of actor calls that did not finish; no call of a
    pass may be running."""
    for stale in cache.shard_dir.glob("*.tmp"):
        stale.unlink()


def run_features(cfg: Config, out_dir: Path, data: PreparedData | None = None) -> ActivationCache:
    """Make sure the activation cache for ``cfg`` is complete; write rejects and a data summary in out_dir."""
    from sparserm.ray_train import ensure_ray

    data = data or prepare_data(cfg)
    write_rejects(data.rejects, out_dir / "rejects.jsonl")
    write_json(out_dir / "data_summary.json", data.summary)
    cache = ActivationCache(cache_root(cfg, data.checksums))
    if not cache.is_complete and pull(cfg.run.cache_dir, cache.root):
        print(f"[features] pulled from {cfg.run.cache_dir}: {cache.root.name}", flush=True)
    if cache.is_complete:
        print(f"[features] cache complete, model pass skipped: {cache.root}", flush=True)
        return cache
    from sparserm.sae.checks import preflight

    preflight(cfg)  # a registry/local SAE that does not fit model.layer, the model or reward.top_k: said now
    ensure_ray(cfg.run.ray_address, log_to_driver=False)
    from sparserm.features.extract import extract_to_shards

    t0 = time.time()
    drop_partial_shards(cache)  # of a pass that was stopped
    for old in cache.shard_dir.glob("chunk-*"):  # an unfinished pass in the old layout: redone in this one,
        shutil.rmtree(old)                       # so every shard of a cache has the same column types
    done = cache.done_row_ids()
    todo = [r for r in data.rows if r["row_id"] not in done]
    if done:
        print(f"[features] resuming: {len(data.rows) - len(todo)} of {len(data.rows)} pairs already cached", flush=True)
    with progress_bar(total=len(data.rows), initial=len(data.rows) - len(todo), desc="features: model pass",
              unit="pair") as bar:
        computed = 0

        def on_batch(n_pairs: int, n_computed: int) -> None:
            nonlocal computed
            computed += n_computed
            # drawn by the update (a refresh of its own wrote every update twice to a log)
            bar.set_postfix(computed_tokens_per_s=f"{computed / (time.time() - t0):.0f}", refresh=False)
            bar.update(n_pairs)

        node_ids = extract_to_shards(todo, str(cache.shard_dir), cfg.model, cfg.features, cfg.run.cache_dir,
                                     cfg.run.seed, on_batch=on_batch,
                                     shard_home=shard_home(cfg.run.cache_dir, cache.shard_dir))
    pull(cfg.run.cache_dir, cache.shard_dir)  # a cache on a URI: the shards actors on other nodes pushed there
    drop_partial_shards(cache)  # of calls whose actor was killed (Ray Data redid them on a restarted actor)
    pooled = cache.read_pooled(cfg.model.layer)
    counts = Counter(pooled.meta["row_id"])
    if len(counts) != len(data.rows) or set(counts.values()) != {2}:
        raise RuntimeError(f"activation cache {cache.root}: expected both texts of {len(data.rows)} pairs once each, "
                           f"found {len(counts)} pairs and {len(pooled.meta['row_id'])} texts (two passes wrote "
                           f"into it at once?); remove the folder and run again")
    cache.mark_complete({
        "key": cache.root.name, "n_pairs": len(data.rows), "n_texts": len(pooled.meta["row_id"]),
        "d_model": int(pooled.states.shape[1]), "n_tokens": int(pooled.meta["n_tokens"].sum()), "n_computed": int(pooled.meta["n_computed"].sum()),
        "seconds": round(time.time() - t0, 1), "layers": list(cfg.model.layers), "pooling": cfg.model.pooling,
        "inputs": data.checksums, "node_ids": node_ids,  # the Ray nodes whose actors computed this call's pairs
    })
    push(cfg.run.cache_dir, cache.root, marker=COMPLETE_FILE)
    print(f"[features] {cache.summary['n_texts']} texts, {cache.summary['n_computed']} tokens computed "
          f"in {cache.summary['seconds']} s -> {cache.root}", flush=True)
    return cache
