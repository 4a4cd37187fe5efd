"""The preference trainer's held-out pairs: its loss and reward accuracy, sharded over the Ray Train ranks."""
from __future__ import annotations

import torch

from sparserm.train_state import all_reduced

__all__ = ["validate"]


def validate(forward_loss, engine, val_idx: list[int], rank: int, world: int, micro: int, device) -> dict:
    """The objective's loss and reward accuracy on the held-out pairs, sharded over the ranks. Every rank takes
    as many (repeats past the end count zero), so all run the same forwards (ZeRO-3 gathers collectively)."""
    engine.eval()
    n = len(val_idx)
    pos = list(range(rank, -(-n // world) * world, world))
    sums = torch.zeros(3, dtype=torch.float64)  # loss, correct, count
    with torch.no_grad():
        for b in range(0, len(pos), micro):
            keep = torch.tensor([float(j < n) for j in pos[b: b + micro]], dtype=torch.float64)
            losses, u = forward_loss([val_idx[j % n] for j in pos[b: b + micro]])
            sums += torch.stack([(losses.double().cpu() * keep).sum(), ((u > 0).double().cpu() * keep).sum(),
                                 keep.sum()])
    sums = all_reduced(sums, device, world)
    return {"val_loss": float(sums[0] / sums[2]), "val_reward_accuracy": float(sums[1] / sums[2]), "n_val": n}
