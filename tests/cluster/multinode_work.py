"""The work of tests/cluster/test_multinode.py (``run_work``): the features pass with two actors, the reward
head with two Ray Train workers on the pooled residuals, and one DPO epoch with two workers, each at one CPU a
worker, on the Ray this process has joined (or joins: ``address``). As a script, a driver of its own joined to a
cluster, writing what ``run_work`` returns to ``<out>/work.json``:

    python multinode_work.py GCS_ADDRESS TINY_MODEL_DIR PAIRS_JSONL OUT_DIR [MLFLOW_URI]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def overrides(address: str | None, model_dir: str, pairs: str, out: Path, mlflow_uri: str | None = None) -> list[str]:
    return [*([f"run.ray_address={address}"] if address else []), f"run.cache_dir={out / 'cache'}",
            *([f"tracking.mlflow_uri={mlflow_uri}"] if mlflow_uri else []),
            f"model.name={model_dir}",
            "model.layer=2", "model.max_tokens=32", "model.device=cpu", f"data.sources=[{{path: '{pairs}'}}]",
            "features.num_actors=2", "features.num_cpus=1", "features.batch_size=3",
            "reward.num_workers=2", "reward.num_cpus=1", "reward.hidden=16", "reward.epochs=2", "reward.batch_size=4",
            "align.train.num_workers=2", "align.train.num_cpus=1", "align.train.epochs=1",
            "align.train.batch_size=4", "align.train.micro_batch_size=2", "align.train.backend=gloo",
            "align.generate.max_new_tokens=16", "align.generate.max_prompt_tokens=64"]


def run_work(address: str | None, model_dir: str, pairs: str, out_dir: str, mlflow_uri: str | None = None) -> dict:
    """Where the outputs are, the node ids the work reported, the DPO epoch's row (its tracker logs it to MLflow
    at ``mlflow_uri`` too, when given), the alive nodes with their resources, and the seconds of each part."""
    import ray

    from sparserm.align.trainer import train_dpo
    from sparserm.tracking import node_local_store_note
    from sparserm.config import load_config
    from sparserm.features.stage import prepare_data, run_features
    from sparserm.reward.train_head import train_head

    out = Path(out_dir)
    cfg = load_config(None, overrides(address, model_dir, pairs, out, mlflow_uri))
    seconds = {"start": time.time()}
    cache = run_features(cfg, out / "features")  # joins the cluster (run.ray_address) unless Ray is up
    seconds["features"] = time.time()
    _, x_w, x_l = cache.read_pooled(cfg.model.layer).pairs()
    r = cfg.reward
    head = train_head({"x_w": x_w[:8], "x_l": x_l[:8]}, {"x_w": x_w[8:], "x_l": x_l[8:]}, hidden=r.hidden,
                      epochs=r.epochs, batch_size=r.batch_size, num_workers=r.num_workers, num_cpus=r.num_cpus,
                      seed=cfg.run.seed, storage_dir=out / "head", name="head", progress=False,
                      ray_address=address)
    seconds["head"] = time.time()
    dpo = train_dpo(cfg, prepare_data(cfg).rows[:8], storage_dir=out / "dpo", name="dpo", progress=False)
    seconds["dpo"] = time.time()
    return {
        "cache": str(cache.root), "features_nodes": cache.summary["node_ids"],
        "head": str(head.checkpoint_dir / "best"), "head_nodes": [p["node_id"] for p in head.placements],
        "dpo_adapter": dpo["adapter"], "dpo_nodes": [p["node_id"] for p in dpo["history"][0]["placements"]],
        "dpo_log_dir": str(out / "dpo" / "dpo" / "tensorboard"),
        "dpo_row": {k: dpo["history"][0][k] for k in ("loss", "reward_accuracy", "global_step", "step_loss")},
        "seconds": {k: round(seconds[k] - seconds[j], 1) for j, k in zip(seconds, list(seconds)[1:])},
        "local_store_note": node_local_store_note(f"sqlite:///{out}/mlruns/mlflow.db"),  # what a tracker would print
        "nodes": {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}}


if __name__ == "__main__":
    Path(sys.argv[4], "work.json").write_text(json.dumps(run_work(*sys.argv[1:6]), indent=1))
