"""Pairwise reward-model losses (SPEC §2.6). Every loss: ``loss(s_w, s_l, *, margin=1.0) -> scalar``.

``s_w``/``s_l`` are the head's scores for the chosen/rejected responses of the same pairs, shape [N].
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["LOSSES", "get_loss", "margin_loss", "bt_loss", "bce_loss"]


def margin_loss(s_w: torch.Tensor, s_l: torch.Tensor, *, margin: float = 1.0) -> torch.Tensor:
    """mean max(0, γ − (s_w − s_l)) — the paper's default, γ = ``margin``."""
    return torch.clamp(margin - (s_w - s_l), min=0.0).mean()


def bt_loss(s_w: torch.Tensor, s_l: torch.Tensor, *, margin: float = 1.0) -> torch.Tensor:
    """Bradley–Terry: mean −log σ(s_w − s_l) (``margin`` is ignored)."""
    return -F.logsigmoid(s_w - s_l).mean()


def bce_loss(s_w: torch.Tensor, s_l: torch.Tensor, *, margin: float = 1.0) -> torch.Tensor:
    """BCE-with-logits on absolute labels: each response scored alone, chosen → 1, rejected → 0;
    mean over all 2N responses (``margin`` is ignored)."""
    logits = torch.cat([s_w, s_l])
    labels = torch.cat([torch.ones_like(s_w), torch.zeros_like(s_l)])
    return F.binary_cross_entropy_with_logits(logits, labels)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"margin": margin_loss, "bt": bt_loss, "bce": bce_loss}


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}: expected one of {', '.join(LOSSES)}") from None
