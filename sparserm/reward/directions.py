"""Latent selection by activation frequency and projection onto SAE decoder directions (SPEC §2.2–2.4).

Conventions: ``mu_w``/``mu_l`` are per-latent activation frequencies (length m) over chosen/rejected texts;
``W_dec`` is the SAE decoder, one row per latent (``[m, d]``, as in sae-lens); ids are ``torch.long``.
"""
from __future__ import annotations

import torch

__all__ = ["frequency_scores", "select_latents", "directions", "project", "random_directions",
           "select_activations"]


def _vec(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per latent), got shape {tuple(t.shape)}")
    return t


def frequency_scores(mu_w, mu_l) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad, delta)`` with ``grad = mu_w - mu_l`` and ``delta = mu_l - mu_w`` (float64, length m)."""
    w, l = _vec(mu_w, "mu_w"), _vec(mu_l, "mu_l")
    if w.shape != l.shape:
        raise ValueError(f"mu_w and mu_l differ in length: {w.numel()} vs {l.numel()}")
    return w - l, l - w


def _top_k(score: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Ids of the k highest scores, ties broken by lower latent id, in descending-score order."""
    ids = torch.arange(score.numel())
    if exclude is not None and exclude.numel():
        keep = torch.ones(score.numel(), dtype=torch.bool)
        keep[exclude] = False
        ids, score = ids[keep], score[keep]
    # ids are ascending, so a stable sort on -score keeps the lower id first among equal scores
    order = torch.sort(-score, stable=True).indices
    return ids[order[:k]].clone()


def select_latents(mu_w, mu_l, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pos_ids, neg_ids)``: top-``k`` latents by ``grad`` (F_w) and top-``k`` by ``delta`` (F_l).

    Each list is ordered by descending score; equal scores are broken by the lower latent id, so the
    result is deterministic. The sets are disjoint by construction: F_w is chosen first and F_l is the
    top-k by ``delta`` among the remaining latents. This only matters when there are ties — typically
    latents with ``grad == 0`` (never active, or equally often on both sides) fill the tail of both
    sets when fewer than k latents have a strictly positive score on that side; without the exclusion
    such a latent could land in both sets and give a duplicated direction. Hence ``2 * k <= m`` is
    required (``ValueError`` otherwise).
    """
    grad, delta = frequency_scores(mu_w, mu_l)
    m = grad.numel()
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if 2 * k > m:
        raise ValueError(f"k={k} is too large for m={m} latents: the two disjoint sets need 2k <= m")
    pos = _top_k(grad, k)
    neg = _top_k(delta, k, exclude=pos)
    return pos, neg


def directions(W_dec: torch.Tensor, pos_ids, neg_ids) -> torch.Tensor:
    """Decoder rows of ``pos_ids ++ neg_ids``: ``[2K, d]`` float32 (column order of :func:`project`)."""
    if W_dec.ndim != 2:
        raise ValueError(f"W_dec must be [m, d], got shape {tuple(W_dec.shape)}")
    ids = torch.cat([torch.as_tensor(pos_ids, dtype=torch.long), torch.as_tensor(neg_ids, dtype=torch.long)])
    return W_dec.detach()[ids.to(W_dec.device)].float().contiguous()


def project(h: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Raw inner products ``v[n, j] = <h[n], dirs[j]>``: ``[N, d] x [2K, d] -> [N, 2K]`` (float32)."""
    if h.ndim != 2 or dirs.ndim != 2 or h.shape[1] != dirs.shape[1]:
        raise ValueError(f"project needs h [N, d] and dirs [2K, d]; got {tuple(h.shape)} and {tuple(dirs.shape)}")
    return h.float() @ dirs.to(h.device).float().T


def random_directions(d: int, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` random unit-norm directions in R^d (``[n, d]`` float32), reproducible from ``seed``.

    The "random directions" ablation: same head, same 2K width, projections onto these instead of the
    selected decoder rows (SAE decoder rows are unit norm too, so scales are comparable).
    """
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(n, d, generator=g, dtype=torch.float32)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def select_activations(f: torch.Tensor, pos_ids, neg_ids) -> torch.Tensor:
    """The "raw SAE activations" ablation input: columns ``pos_ids ++ neg_ids`` of ``f = encode(h)``
    (``[N, m] -> [N, 2K]`` float32)."""
    ids = torch.cat([torch.as_tensor(pos_ids, dtype=torch.long), torch.as_tensor(neg_ids, dtype=torch.long)])
    return f[:, ids.to(f.device)].float()
