"""Pairwise reward-model accuracy (SPEC §2.7)."""
from __future__ import annotations

import torch

__all__ = ["pair_accuracy"]


def pair_accuracy(s_w, s_l) -> float:
    """Share of pairs with ``s_w > s_l`` (a tie counts as wrong)."""
    s_w, s_l = torch.as_tensor(s_w), torch.as_tensor(s_l)
    if s_w.shape != s_l.shape:
        raise ValueError(f"s_w and s_l differ in shape: {tuple(s_w.shape)} vs {tuple(s_l.shape)}")
    if s_w.numel() == 0:
        raise ValueError("pair_accuracy of zero pairs is undefined")
    return float((s_w > s_l).float().mean().item())
