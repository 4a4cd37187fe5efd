"""Placement of the alignment job's actors: generation engines, the policy evaluator, the reward scorer, the
judge, and (reserved here, created by Ray Train) the DPO workers. One function owns it.

Resources come from config under one naming style: ``num_cpus`` / ``num_gpus`` per actor or worker
(``align.policy``, ``align.scorer``, ``align.generate.vllm`` per tensor-parallel rank, ``align.train`` per
worker). Fractions colocate: on one GPU, e.g. vLLM 0.4 + evaluator 0.2 + scorer 0.2 + one DPO worker 0.2 =
1.0, and generation -> scoring -> DPO -> evaluation run in turn (vLLM sleeps while DPO trains, so its
memory is free). The sum of every request is checked against the cluster before anything is created, and
every placement group must be granted within ``PLACEMENT_TIMEOUT_S``, so a job that cannot be placed fails
with the reason instead of waiting forever (the actors' constructors, which load models, get an hour).

``auto`` picks vLLM when the cluster has GPUs and vLLM imports, else the transformers engine, which then is
also the evaluator (one copy of the model). Generation, scoring and training never run at the same time,
so each actor sets its torch threads to every core.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import ray

from sparserm.align.engines.gather import gather, spans
from sparserm.config import Config, ConfigError, to_dict
from sparserm.train_state import placement_info

PLACEMENT_TIMEOUT_S = 120.0  # for the placement groups: resources that are there are granted in seconds
ACTOR_START_TIMEOUT_S = 3600.0  # for the actors' constructors: a hub download and vLLM's start can take long


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

        from sparserm.ray_train import quiet_worker_logs
        from sparserm.reward.model import SparseRM

        quiet_worker_logs()
        if num_threads:
            torch.set_num_threads(num_threads)
        self.rm = SparseRM.load(rm_dir)

    def score_pairs(self, prompts: list[str], chosen: list[str], rejected: list[str]):
        return self.rm.score_pairs(prompts, chosen, rejected)

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self.rm.score(prompts, responses)

    def placement(self) -> dict:
        return placement_info()


class EnginePool:
    """Engines behind one call: prompts are split into contiguous shards, one per engine."""

    def __init__(self, kind: str, actors: list):
        self.kind, self.actors = kind, actors

    def set_adapter(self, path: str | None) -> None:
        ray.get([a.set_adapter.remote(path) for a in self.actors])

    def generate(self, conversations: list[list[dict]], sampling: dict, seed: int, batch_size: int,
                 bar=None) -> list[dict]:
        """One response per conversation. Engine i takes the i-th contiguous shard, sent in chunks of at least
        ``batch_size`` (``gather``: ``bar`` advances per chunk); a chunk starting at request j is seeded
        ``seed + j``, so every request of the call has its own seed (vLLM seeds per request: its samples do
        not depend on the chunking or the number of engines)."""
        k = len(self.actors)
        size = -(-len(conversations) // k)
        calls = []
        for i, actor in enumerate(self.actors):
            shard = conversations[i * size:(i + 1) * size]
            calls += [(actor.generate.remote(shard[s:e], sampling, seed + i * size + s, batch_size), e - s)
                      for s, e in spans(len(shard), batch_size)]
        return [r for part in gather(calls, bar) for r in part]

    def sleep(self) -> None:
        """Free the engines' GPU memory while another phase (DPO) uses the GPU; a no-op for transformers."""
        if self.kind == "vllm":
            ray.get([a.sleep.remote() for a in self.actors])

    def wake_up(self) -> None:
        if self.kind == "vllm":
            ray.get([a.wake_up.remote() for a in self.actors])


@dataclass
class AlignActors:
    pool: EnginePool
    policy: object  # HFPolicy actor: evaluation log-probs (and generation when pool.kind == "hf")
    scorer: object  # RewardScorer actor
    judge: object | None  # HFJudge actor, when a task's labeller is ``judge``
    placement_groups: list
    placement: dict | None = None  # role -> {node_id, gpu_ids} of every actor, once all are up

    def roles(self) -> dict[str, object]:
        out = {"policy": self.policy, "scorer": self.scorer, **({"judge": self.judge} if self.judge else {})}
        out.update({f"engine_{i}": a for i, a in enumerate(self.pool.actors) if a is not self.policy})
        return out

    def close(self) -> None:
        """Kill every actor and remove the placement groups, so their CPUs and GPUs are free at once (not
        when the last handle is collected: a traceback that holds the job keeps them alive)."""
        from ray.util.placement_group import remove_placement_group

        for actor in self.roles().values():
            ray.kill(actor)
        for pg in self.placement_groups:
            remove_placement_group(pg)
        self.placement_groups = []


def gpu_demand(cfg: Config, kind: str, needs_judge: bool) -> list[tuple[str, float, int]]:
    """(config key, GPUs per actor or worker, count) of everything the job holds at once."""
    a = cfg.align
    v = a.generate.vllm
    out = [("align.policy.num_gpus", a.policy.num_gpus, 1), ("align.scorer.num_gpus", a.scorer.num_gpus, 1),
           ("align.train.num_gpus", a.train.num_gpus, a.train.num_workers)]
    if needs_judge:
        out.append(("align.judge.num_gpus", a.judge.num_gpus, 1))
    if kind == "vllm":
        out.append(("align.generate.vllm.num_gpus", v.num_gpus, v.num_engines * v.tensor_parallel_size))
    return out


def check_fits(cfg: Config, kind: str, needs_judge: bool) -> None:
    """Refuse, naming the keys, a job whose GPU requests exceed the cluster's GPUs or one GPU each."""
    demand = gpu_demand(cfg, kind, needs_judge)
    have = ray.cluster_resources().get("GPU", 0.0)
    for key, per, count in demand:
        if per > 1 and per != int(per):
            raise ConfigError(f"{key}={per}: a request above one GPU must be a whole number")
    total = sum(per * count for _, per, count in demand)
    if total > have + 1e-9:
        parts = ", ".join(f"{key} {per} x {count}" for key, per, count in demand if per)
        raise ConfigError(f"the alignment job asks for {total:g} GPUs ({parts}) but the cluster has {have:g}: "
                          "lower the fractions to share a GPU, or add GPUs")


def make_actors(cfg: Config, rm_dir: str) -> AlignActors:
    from sparserm.align.engines.hf import HFJudge, HFPolicy

    a = cfg.align
    kind = resolve_engine(a.generate.engine)
    needs_judge = "judge" in (a.generate.labellers.truthfulqa, a.generate.labellers.harmless)
    check_fits(cfg, kind, needs_judge)
    threads = a.train.torch_threads or os.cpu_count() or 1
    policy = ray.remote(HFPolicy).options(num_cpus=a.policy.num_cpus, num_gpus=a.policy.num_gpus).remote(
        to_dict(cfg.model), cfg.run.cache_dir, threads)
    scorer = ray.remote(RewardScorer).options(num_cpus=a.scorer.num_cpus, num_gpus=a.scorer.num_gpus).remote(
        rm_dir, threads)
    judge = None
    if needs_judge:
        judge_model = {**to_dict(cfg.model), "name": a.generate.judge_model, "gguf_file": None, "revision": None,
                       "chat_template": True}  # a judge is asked as a chat model whatever the policy's setting
        judge = ray.remote(HFJudge).options(num_cpus=a.judge.num_cpus, num_gpus=a.judge.num_gpus).remote(
            judge_model, cfg.run.cache_dir, threads)
    pgs = []
    if kind == "hf":
        pool = EnginePool("hf", [policy])
    else:
        engines = []
        for i in range(a.generate.vllm.num_engines):
            engine, pg = _vllm_engine(cfg, i)
            engines.append(engine)
            pgs.append(pg)
        pool = EnginePool("vllm", engines)
    actors = AlignActors(pool, policy, scorer, judge, pgs)
    try:
        actors.placement = wait_placed(actors)
    except BaseException:
        actors.close()  # what was granted is given back before the error reaches the caller
        raise
    return actors


def wait_placed(actors: AlignActors, timeout_s: float = PLACEMENT_TIMEOUT_S,
                start_timeout_s: float = ACTOR_START_TIMEOUT_S) -> dict[str, dict]:
    """Every placement group ready and every actor constructed, or an error naming what is not; returns
    where each actor runs."""
    for i, pg in enumerate(actors.placement_groups):
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            raise RuntimeError(f"vLLM engine {i}: its placement group {pg.bundle_specs} was not placed in "
                               f"{timeout_s:.0f} s; the cluster has {ray.available_resources()} free")
    roles = actors.roles()
    refs = {role: actor.placement.remote() for role, actor in roles.items()}
    _, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=start_timeout_s)
    if pending:
        late = [role for role, ref in refs.items() if ref in pending]
        raise RuntimeError(f"alignment actors {late} did not start in {start_timeout_s:.0f} s; "
                           f"free resources: {ray.available_resources()}")
    return {role: ray.get(ref) for role, ref in refs.items()}


def _vllm_engine(cfg: Config, index: int):
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from sparserm.align.engines.vllm import VLLMEngine

    v = cfg.align.generate.vllm
    tp = v.tensor_parallel_size
    pg = placement_group([{"GPU": v.num_gpus, "CPU": v.num_cpus}] * tp, strategy="STRICT_PACK")
    strategy = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=0,
                                                placement_group_capture_child_tasks=True)
    # TP = 1: the engine actor holds the bundle's GPU share itself. TP > 1: vLLM's Ray workers take the
    # bundles (each VLLM_RAY_PER_WORKER_GPUS of a GPU), and the engine actor itself holds none.
    env = {"VLLM_RAY_PER_WORKER_GPUS": str(v.num_gpus), "VLLM_RAY_BUNDLE_INDICES": ",".join(map(str, range(tp)))}
    return ray.remote(VLLMEngine).options(
        num_cpus=0, num_gpus=v.num_gpus if tp == 1 else 0, scheduling_strategy=strategy,
        runtime_env={"env_vars": env}).remote(
        to_dict(cfg.model), cfg.run.cache_dir, tensor_parallel_size=tp,
        gpu_memory_utilization=v.gpu_memory_utilization, max_model_len=v.max_model_len,
        max_lora_rank=v.max_lora_rank, seed=cfg.run.seed + index, enable_sleep_mode=v.enable_sleep_mode,
        enforce_eager=v.enforce_eager), pg
