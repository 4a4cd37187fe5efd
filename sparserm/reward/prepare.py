"""Everything the reward head is fitted on, from the cached features: SAE, frequencies, directions and the
train / validation / eval pairs. Shared by ``rm train`` and ``rm ablate`` so both see the same split.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparserm.config import Config
from sparserm.features.cache import ActivationCache, PooledTable
from sparserm.features.stage import run_features
from sparserm.features.stats import LatentFrequencies, latent_frequencies
from sparserm.reward.directions import directions, select_latents
from sparserm.sae import SparseAutoencoder
from sparserm.sae.stage import tracked_sae


@dataclass
class PairSet:
    """Pooled states of matched pairs, with their metadata."""

    h_w: torch.Tensor  # [N, d]
    h_l: torch.Tensor  # [N, d]
    row_id: np.ndarray
    source: np.ndarray
    len_w: np.ndarray  # tokens of the response-bearing texts (for the length baseline)
    len_l: np.ndarray
    prompt_id: np.ndarray  # pairs of one prompt share it (splits and folds go by prompt)

    def __len__(self) -> int:
        return len(self.row_id)

    def take(self, mask: np.ndarray) -> "PairSet":
        m = torch.as_tensor(mask)
        return PairSet(self.h_w[m], self.h_l[m], self.row_id[mask], self.source[mask], self.len_w[mask],
                       self.len_l[mask], self.prompt_id[mask])

    def join(self, other: "PairSet") -> "PairSet":
        return PairSet(torch.cat([self.h_w, other.h_w]), torch.cat([self.h_l, other.h_l]),
                       *(np.concatenate([getattr(self, f), getattr(other, f)])
                         for f in ("row_id", "source", "len_w", "len_l", "prompt_id")))

    def folds(self, n: int, salt: str) -> np.ndarray:
        """Fold index in [0, n) of every pair, by a hash of its prompt (a prompt's pairs share a fold)."""
        return np.array([min(int(_unit_hash(p, salt + ":fold") * n), n - 1) for p in self.prompt_id], dtype=np.int64)


@dataclass
class RewardData:
    cache: ActivationCache
    layer: int
    sae: SparseAutoencoder
    sae_dir: Path | None
    sae_metrics: dict
    freqs: LatentFrequencies
    pos_ids: torch.Tensor
    neg_ids: torch.Tensor
    dirs: torch.Tensor  # [2K, d]
    train: PairSet
    val: PairSet  # a prompt-hashed share of the training split, for choosing the best epoch
    eval: PairSet  # the held-out split


def pair_sets(table: PooledTable, val_fraction: float, salt: str) -> tuple[PairSet, PairSet, PairSet]:
    iw, il = table.pair_index()
    meta = table.meta
    pairs = PairSet(table.states[torch.as_tensor(iw)], table.states[torch.as_tensor(il)], meta["row_id"][iw],
                    meta["source"][iw], meta["n_tokens"][iw], meta["n_tokens"][il], meta["prompt_id"][iw])
    split = meta["split"][iw]
    val = np.array([_unit_hash(p, salt + ":val") < val_fraction for p in meta["prompt_id"][iw]], dtype=bool)
    return pairs.take((split == "train") & ~val), pairs.take((split == "train") & val), pairs.take(split == "eval")


def _unit_hash(text: str, salt: str) -> float:
    return int.from_bytes(hashlib.sha256(f"{salt}\0{text}".encode()).digest()[:8], "big") / 2 ** 64


def prepare_reward_data(cfg: Config, out_dir: Path, cache: ActivationCache | None = None) -> RewardData:
    cache = cache or run_features(cfg, out_dir)
    layer, d_model = cfg.model.layer, cache.summary["d_model"]
    sae, sae_dir, sae_metrics = tracked_sae(cfg, cache, layer, d_model, out_dir)  # <out_dir>/tensorboard/sae-layer<L>
    pooled = cache.read_pooled(layer)  # read once: the latent frequencies and the pair sets
    freqs = latent_frequencies(pooled, sae, split="train", where=f"activation cache {cache.root}")
    pos, neg = select_latents(freqs.mu_w, freqs.mu_l, cfg.reward.top_k)
    dirs = directions(sae.W_dec.detach().cpu().float(), pos, neg)
    train, val, held_out = pair_sets(pooled, cfg.reward.val_fraction, cfg.data.split_salt)
    if min(len(train), len(val), len(held_out)) == 0:
        raise ValueError(f"too few pairs to fit and evaluate: train={len(train)} val={len(val)} (the share "
                         f"reward.val_fraction={cfg.reward.val_fraction} of the training split's prompts) "
                         f"eval={len(held_out)} (data.eval_fraction={cfg.data.eval_fraction} of the prompts)")
    return RewardData(cache, layer, sae, sae_dir, sae_metrics, freqs, pos, neg, dirs, train, val, held_out)
