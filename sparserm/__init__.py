"""sparserm: preference signals read from sparse-autoencoder features, on Ray.

What a cluster job imports, from the package top (each is imported on first use, so ``import sparserm`` stays
light and pulls neither torch nor Ray)::

    from sparserm import load_config, SparseRM, RewardClient, HTTPRewardClient
    cfg = load_config("jobs/configs/quickstart.yaml", ["run.seed=1"])
    rm = SparseRM.load("runs/rm/rm")                      # a reward-model folder
    rm.score(["How do I bake bread?"], ["Mix flour, water and yeast."])

Each stage is the function its CLI command calls: ``run_features``, ``run_sae_stage``, ``run_rm_train``,
``run_sweep``, ``run_ablation``, ``run_align``, ``run_fpo_compare``, ``build_map``.
"""
from __future__ import annotations

import importlib

# name -> the module that holds it
_EXPORTS = {
    "Config": "sparserm.config", "load_config": "sparserm.config", "ConfigError": "sparserm.config",
    "SparseRM": "sparserm.reward.model",
    "RewardClient": "sparserm.serve.client", "HTTPRewardClient": "sparserm.serve.client",
    "score_dataset": "sparserm.serve.client", "SparseRMReward": "sparserm.serve.client",
    "run_features": "sparserm.features.stage", "run_sae_stage": "sparserm.sae.stage",
    "run_rm_train": "sparserm.reward.stage", "run_sweep": "sparserm.reward.sweep",
    "run_ablation": "sparserm.reward.ablate", "run_align": "sparserm.align.cli",
    "run_fpo_compare": "sparserm.fpo.compare", "build_map": "sparserm.steering.build",
    "SteeredGenerator": "sparserm.steering.generate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sparserm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
