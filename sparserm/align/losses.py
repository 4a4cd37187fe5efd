"""Preference losses over sequence log-probs, by name (``align.loss.name``). FPO adds its own entry.

Each loss takes the policy's and the reference's summed response log-probs of the chosen (w) and
rejected (l) responses, [B] each, and returns the per-pair loss [B] and the implicit reward margin
u / beta-scaled quantities used for logging.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
LOSSES: dict[str, LossFn] = {}


def register(name: str) -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        return fn

    return deco


def get_loss(name: str) -> LossFn:
    if name not in LOSSES:
        raise ValueError(f"align.loss.name={name!r} is unknown: expected one of {sorted(LOSSES)}")
    return LOSSES[name]


@register("dpo")
def dpo_loss(pi_w: torch.Tensor, pi_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, *,
             beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """u = beta[(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]; loss = -log sigma(u)."""
    u = beta * ((pi_w - ref_w) - (pi_l - ref_l))
    return -F.logsigmoid(u), u.detach()
