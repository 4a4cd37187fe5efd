"""Latent activation frequencies for chosen and rejected texts, aggregated across the whole dataset.

A Ray Data pass over the cached pooled states: SAE actors encode each batch and return only per-batch
counts (one row per side, m numbers); the driver adds those up and never holds the rows themselves.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sparserm.features.cache import ActivationCache


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


class LatentCounter:
    """Callable class for ``map_batches``: one SAE per actor."""

    def __init__(self, sae_cfg: dict, trained_dir: str | None, layer: int):
        from sparserm.config import SAEConfig, build
        from sparserm.sae import load_sae

        self.sae = load_sae(build(SAEConfig, sae_cfg), device=torch.device("cpu"), trained_dir=trained_dir)
        self.column = f"pooled_{layer}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        h = torch.as_tensor(np.stack(list(batch[self.column])) if batch[self.column].dtype == object
                            else batch[self.column], dtype=torch.float32)
        with torch.no_grad():
            active = (self.sae.encode(h) > 0).numpy()
        sides = batch["side"]
        return {"side": np.array(["chosen", "rejected"]),
                "n": np.array([(sides == "chosen").sum(), (sides == "rejected").sum()]),
                "counts": np.stack([active[sides == "chosen"].sum(0), active[sides == "rejected"].sum(0)])}


def latent_frequencies(cache: ActivationCache, layer: int, sae_cfg: dict, trained_dir: str | None,
                       split: str = "train", batch_size: int = 256) -> LatentFrequencies:
    import ray

    files = [str(f) for f in cache.files()]
    ds = ray.data.read_parquet(files, columns=["side", "split", f"pooled_{layer}"])
    ds = ds.filter(lambda row: row["split"] == split)
    ds = ds.map_batches(LatentCounter, fn_constructor_kwargs={"sae_cfg": sae_cfg, "trained_dir": trained_dir,
                                                              "layer": layer},
                        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
                        num_cpus=1)
    totals: dict[str, list] = {"chosen": [None, 0], "rejected": [None, 0]}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for side, n, counts in zip(batch["side"], batch["n"], batch["counts"]):
            acc = totals[str(side)]
            acc[0] = counts.astype(np.int64) if acc[0] is None else acc[0] + counts
            acc[1] += int(n)
    if totals["chosen"][0] is None:
        raise ValueError(f"no {split}-split texts in activation cache {cache.root}")
    return LatentFrequencies(totals["chosen"][0], totals["rejected"][0], totals["chosen"][1], totals["rejected"][1])
