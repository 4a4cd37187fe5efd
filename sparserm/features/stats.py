"""Latent activation frequencies for chosen and rejected texts of one split.

Computed in the driver from the pooled states it reads for the reward head anyway (one vector per text, read
once), in batches through the SAE it already holds: no second read of the cache, and no Ray pass whose read
tasks would wait for a CPU that a cluster's other work (a Serve app, say) holds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sparserm.features.cache import PooledTable


@dataclass
class LatentFrequencies:
    count_w: np.ndarray  # [m] chosen texts on which latent j is active
    count_l: np.ndarray  # [m] rejected texts likewise
    n_w: int
    n_l: int

    @property
    def mu_w(self) -> np.ndarray:
        return self.count_w / max(self.n_w, 1)

    @property
    def mu_l(self) -> np.ndarray:
        return self.count_l / max(self.n_l, 1)


def latent_frequencies(pooled: PooledTable, sae, split: str = "train", batch_size: int = 1024,
                       where: str = "the activation cache") -> LatentFrequencies:
    """For each SAE latent, on how many chosen and how many rejected texts of ``split`` it is active (> 0)."""
    keep = pooled.meta["split"] == split
    if not keep.any():
        raise ValueError(f"no {split}-split texts in {where}")
    sides = pooled.meta["side"][keep]
    states = pooled.states[torch.as_tensor(keep)]
    counts = {name: np.zeros(sae.d_sae, dtype=np.int64) for name in ("chosen", "rejected")}
    for start in range(0, len(states), batch_size):
        active = (sae.encode(states[start:start + batch_size]) > 0).cpu().numpy()
        side = sides[start:start + batch_size]
        for name in counts:
            counts[name] += active[side == name].sum(0, dtype=np.int64)
    return LatentFrequencies(counts["chosen"], counts["rejected"], int((sides == "chosen").sum()), int((sides == "rejected").sum()))
