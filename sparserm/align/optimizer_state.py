"""An optimizer's moments across a resume, as safetensors + JSON (DeepSpeed's own checkpoints are pickles), for
both Ray Train loops: preference training (``sparserm.align.trainer``) and the reward head
(``sparserm.reward.train_head``).

Under every ZeRO stage DeepSpeed steps a plain torch optimizer (``engine.basic_optimizer``) over this rank's
share of the trainable parameters: the parameters themselves at stage 0, flat fp32 partitions at stages 1-3.
Its ``state_dict()`` is tensors plus plain numbers, so each rank writes its own

    optimizer/rank_<r>.safetensors   "<param index>.<name>" -> tensor (exp_avg, exp_avg_sq, step, ...) and
                                     "param.<group>.<i>" -> the parameters it steps (ZeRO's fp32 master copy)
    optimizer/rank_<r>.json          param_groups, world size, ZeRO stage

and loads its own file back on resume. The master copy matters with bf16 (GPU): the adapter is saved from
the bf16 model, and restarting the master from it would drop the low bits of every weight. A share is only
valid for the same world size and ZeRO stage; :func:`load_optimizer_state` refuses anything else (returns
the reason) and the moments restart. The reward head's DDP ranks each hold the whole state, so the head
writes one share: rank 0 of a world of 1, stage 0, and every rank loads it.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["save_optimizer_state", "load_optimizer_state", "stepped_params"]


@contextmanager
def stepped_params(zero_optimizer):
    """With the parameters the torch optimizer steps in its param groups: ZeRO-3 fills them with this rank's
    fp32 partitions only around each step and leaves them empty in between (its ``state_dict()`` then fails
    on every state entry); other stages, and a plain optimizer, keep them, and nothing changes."""
    fill = getattr(zero_optimizer, "_set_fp32_optimizer_param_groups", None)
    groups = getattr(getattr(zero_optimizer, "optimizer", None), "param_groups", None)
    if fill is None or groups is None or any(g["params"] for g in groups):
        yield
        return
    fill()
    try:
        yield
    finally:
        zero_optimizer._clear_fp32_optimizer_param_groups()


def _files(folder: Path, rank: int) -> tuple[Path, Path]:
    return Path(folder, f"rank_{rank}.safetensors"), Path(folder, f"rank_{rank}.json")


def save_optimizer_state(optimizer: torch.optim.Optimizer, folder: Path, *, rank: int, world: int,
                         stage: int) -> None:
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors = {f"{i}.{name}": torch.as_tensor(v).detach().cpu().contiguous()
               for i, st in sd["state"].items() for name, v in st.items()}
    tensors.update({f"param.{g}.{i}": p.detach().cpu().contiguous()
                    for g, group in enumerate(optimizer.param_groups) for i, p in enumerate(group["params"])})
    tensors_path, meta_path = _files(folder, rank)
    Path(folder).mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tensors_path))
    meta_path.write_text(json.dumps({"param_groups": sd["param_groups"], "world_size": world, "zero_stage": stage},
                                    indent=1))


def load_optimizer_state(optimizer: torch.optim.Optimizer, folder: Path, *, rank: int, world: int,
                         stage: int) -> str | None:
    """Restores this rank's optimizer state from ``folder``; ``None`` on success, else why it was not."""
    from safetensors.torch import load_file

    tensors_path, meta_path = _files(folder, rank)
    if not (tensors_path.is_file() and meta_path.is_file()):
        return f"no optimizer state for rank {rank} in the checkpoint"
    meta = json.loads(meta_path.read_text())
    if (meta["world_size"], meta["zero_stage"]) != (world, stage):
        return (f"the optimizer state was saved by {meta['world_size']} worker(s) at ZeRO stage {meta['zero_stage']},"
                f" this run has {world} at stage {stage}")
    tensors = load_file(str(tensors_path))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not key.startswith("param."):
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = t
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    with torch.no_grad():
        for g, group in enumerate(optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                p.copy_(tensors[f"param.{g}.{i}"])
    return None
