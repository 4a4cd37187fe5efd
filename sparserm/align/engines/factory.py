"""Placement of the alignment job's actors: generation engines, the policy evaluator and the reward scorer.

``auto`` picks vLLM when the cluster has GPUs and vLLM imports, else the transformers engine. vLLM engines
get one placement group each (a GPU bundle per tensor-parallel rank). On CPU the transformers engine is
also the evaluator (one copy of the model). Actors hold ``align.actor_cpus`` CPUs each, so that they and the
DPO workers fit the machine together; generation, scoring and training never run at the same time, so
each sets its torch threads to every core.
"""
from __future__ import annotations

import os

import ray

from sparserm.config import Config, to_dict


def resolve_engine(name: str) -> str:
    if name != "auto":
        return name
    if ray.cluster_resources().get("GPU", 0) > 0:
        try:
            import vllm  # noqa: F401

            return "vllm"
        except ImportError:
            pass
    return "hf"


class RewardScorer:
    """A SparseRM folder loaded once; scores pairs or single responses."""

    def __init__(self, rm_dir: str, num_threads: int = 0):
        import torch

        from sparserm.reward.model import SparseRM

        if num_threads:
            torch.set_num_threads(num_threads)
        self.rm = SparseRM.load(rm_dir)

    def score_pairs(self, prompts: list[str], chosen: list[str], rejected: list[str]):
        return self.rm.score_pairs(prompts, chosen, rejected)

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self.rm.score(prompts, responses)


class EnginePool:
    """Engines behind one call: prompts are split into contiguous shards, one per engine."""

    def __init__(self, kind: str, actors: list):
        self.kind, self.actors = kind, actors

    def set_adapter(self, path: str | None) -> None:
        ray.get([a.set_adapter.remote(path) for a in self.actors])

    def generate(self, conversations: list[list[dict]], sampling: dict, seed: int, batch_size: int) -> list[dict]:
        k = len(self.actors)
        size = -(-len(conversations) // k)
        refs = [a.generate.remote(conversations[i * size:(i + 1) * size], sampling, seed + i, batch_size)
                for i, a in enumerate(self.actors) if conversations[i * size:(i + 1) * size]]
        return [r for part in ray.get(refs) for r in part]


def make_actors(cfg: Config, rm_dir: str) -> tuple[EnginePool, object, object]:
    """(engine pool, policy evaluator actor, reward scorer actor)."""
    from sparserm.align.engines.hf import HFPolicy

    a = cfg.align
    threads = a.torch_threads or os.cpu_count() or 1
    gpu = a.use_gpu
    hf_options = {"num_cpus": a.actor_cpus, "num_gpus": 0.1 if gpu else 0}
    policy = ray.remote(HFPolicy).options(**hf_options).remote(to_dict(cfg.model), cfg.run.cache_dir, threads)
    scorer = ray.remote(RewardScorer).options(**hf_options).remote(rm_dir, threads)
    kind = resolve_engine(a.engine)
    if kind == "hf":
        pool = EnginePool("hf", [policy])
    else:
        pool = EnginePool("vllm", [_vllm_engine(cfg, i) for i in range(a.vllm.num_engines)])
    return pool, policy, scorer


def _vllm_engine(cfg: Config, index: int):
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from sparserm.align.engines.vllm import VLLMEngine

    v = cfg.align.vllm
    pg = placement_group([{"GPU": 1, "CPU": 1}] * v.tensor_parallel_size, strategy="STRICT_PACK")
    ray.get(pg.ready())
    strategy = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=0,
                                                placement_group_capture_child_tasks=True)
    # with TP > 1 the engine's own Ray workers take the bundles; the engine actor itself needs no GPU then
    num_gpus = 1 if v.tensor_parallel_size == 1 else 0
    return ray.remote(VLLMEngine).options(num_cpus=0, num_gpus=num_gpus, scheduling_strategy=strategy).remote(
        to_dict(cfg.model), cfg.run.cache_dir, tensor_parallel_size=v.tensor_parallel_size,
        gpu_memory_utilization=v.gpu_memory_utilization, max_model_len=v.max_model_len,
        max_lora_rank=v.max_lora_rank, seed=cfg.run.seed + index)
