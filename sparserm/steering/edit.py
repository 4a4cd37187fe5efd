"""The SAE-latent edit of one decoding step, by mode (``steer.mode``, per request): pure torch.

At a token with output-SAE activations ``a`` [m_out], a request's steering vector selects latents ``j`` with map
scores ``s_j``. Only a selected latent that is already active (``a_j > 0``) is edited:

- ``add``: ``a'_j = a_j + alpha * max(a) * sign(s_j)`` (DSPA: "moved by alpha * max(f_t)"; not clipped at 0, so a
  negative score can push past zero, which the decoder, being linear in ``a``, reads as the opposite direction);
- ``ablate``: ``a'_j = 0`` where ``s_j < 0`` (alpha is not read).

A mode is a function ``(selected activations [B, k], scores [B, k], alpha [B], max(a) [B]) -> new selected
activations [B, k]``; :func:`edit_latents` applies it to the active selected entries only and leaves every other
entry of ``a`` exactly as it was.
"""
from __future__ import annotations

from typing import Callable

import torch

Mode = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _add(sel: torch.Tensor, scores: torch.Tensor, alpha: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    return sel + (alpha * top).unsqueeze(-1) * torch.sign(scores)


def _ablate(sel: torch.Tensor, scores: torch.Tensor, alpha: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    return torch.where(scores < 0, torch.zeros_like(sel), sel)


MODES: dict[str, Mode] = {"add": _add, "ablate": _ablate}


def edit_latents(a: torch.Tensor, latents: torch.Tensor, scores: torch.Tensor, alpha: torch.Tensor,
                 modes: list[str]) -> torch.Tensor:
    """``a'`` [B, m] from activations ``a`` [B, m]: per row, its ``latents`` [B, k] (-1: an unused slot) with map
    ``scores`` [B, k], its ``alpha`` [B] and its mode name ``modes[b]``."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"steer.mode {sorted(unknown)} unknown: expected one of {sorted(MODES)}")
    slot = latents.clamp(min=0)
    sel = a.gather(1, slot)
    active = (latents >= 0) & (sel > 0)
    top = a.max(-1).values
    new = sel.clone()
    for name in set(modes):
        rows = torch.tensor([m == name for m in modes], device=a.device)
        new[rows] = MODES[name](sel[rows], scores[rows].to(sel.dtype), alpha[rows].to(sel.dtype), top[rows])
    change = torch.where(active, new - sel, torch.zeros_like(sel))
    return a.scatter_add(1, slot, change)  # unused slots (and inactive latents) add exactly 0
