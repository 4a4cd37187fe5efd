"""Pairwise reward-model accuracy (SPEC §2.7)."""
from __future__ import annotations

import torch

__all__ = ["pair_accuracy", "paired_difference"]


def pair_accuracy(s_w, s_l) -> float:
    """Share of pairs with ``s_w > s_l`` (a tie counts as wrong)."""
    s_w, s_l = torch.as_tensor(s_w), torch.as_tensor(s_l)
    if s_w.shape != s_l.shape:
        raise ValueError(f"s_w and s_l differ in shape: {tuple(s_w.shape)} vs {tuple(s_l.shape)}")
    if s_w.numel() == 0:
        raise ValueError("pair_accuracy of zero pairs is undefined")
    return float((s_w > s_l).float().mean().item())


def paired_difference(a, b, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Mean of ``a - b`` over the same pairs (per-pair correctness of two models, 0..1) with a paired
    bootstrap confidence interval: pairs are resampled with replacement, both models keep their own value
    on each resampled pair. ``{"diff", "lo", "hi"}``."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape or a.ndim != 1 or a.numel() == 0:
        raise ValueError(f"paired_difference needs two non-empty 1-D tensors of one length, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    d = a - b
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, d.numel(), (n_boot, d.numel()), generator=g)
    boots = d[idx].mean(1)
    tail = (1 - level) / 2
    lo, hi = torch.quantile(boots, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi)}
