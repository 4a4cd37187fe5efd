"""A request's steering vector, computed once from its prompt: the prompt gate and the output latents it selects.

``g(x)`` is the input SAE's activation density over the prompt's own tokens (as the map was built). The gate keeps
the ``k_prompt`` largest entries of g (positive ones; ties: the lower latent id), the map scores the output latents
``s = A^T g_gated``, and the ``k_diff`` largest in ``|s|`` (nonzero; ties: the lower id) are selected, each with
its score, whose sign the edit reads. Everything is computed per request, so a request gets the same vector
alone or inside any batch.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from sparserm.steering.conditional_map import ConditionalMap


@dataclass(frozen=True)
class SteerSettings:
    """What one request asks for (the serving API's ``steering`` object); no defaults here: they are the ``steer``
    section of the map's config (see ``of``)."""

    alpha: float
    mode: str
    k_prompt: int
    k_diff: int
    enabled: bool = True

    @classmethod
    def of(cls, steer_cfg, **changes) -> "SteerSettings":
        """The ``steer`` section's settings, with ``changes`` (e.g. a request's own alpha) applied."""
        base = cls(**{f.name: getattr(steer_cfg, f.name) for f in fields(cls) if f.name != "enabled"})
        return replace(base, **changes)

    def check(self) -> "SteerSettings":
        from sparserm.steering.edit import MODES

        if self.mode not in MODES:
            raise ValueError(f"steering mode {self.mode!r} is unknown: expected one of {sorted(MODES)}")
        if self.alpha < 0 or self.k_prompt < 1 or self.k_diff < 1:
            raise ValueError(f"steering settings out of range: alpha >= 0, k_prompt >= 1, k_diff >= 1 ({self})")
        return self


@dataclass
class SteeringVector:
    latents: torch.Tensor  # int64 [k] output latents selected (k <= k_diff: fewer when fewer scores are nonzero)
    scores: torch.Tensor  # float32 [k] their s_j
    gate: torch.Tensor  # int64 [k_p] the input latents the gate kept
    alpha: float
    mode: str

    def describe(self) -> dict:
        return {"latents": self.latents.tolist(), "scores": [round(float(s), 6) for s in self.scores],
                "gate": self.gate.tolist(), "alpha": self.alpha, "mode": self.mode}


def top_entries(x: torch.Tensor, k: int, by_magnitude: bool = False) -> torch.Tensor:
    """Indices of the ``k`` largest entries of ``x`` [m] (``by_magnitude``: of |x|), nonzero (positive) only,
    ties to the lower index."""
    key = x.abs() if by_magnitude else x
    order = torch.sort(key, descending=True, stable=True).indices[:k]
    return order[key[order] > 0]


def steering_vector(g: torch.Tensor, cmap: ConditionalMap, settings: SteerSettings) -> SteeringVector:
    """The vector of a prompt with input-SAE density ``g`` [m_in] under ``settings``."""
    if g.shape[-1] != cmap.m_in:
        raise ValueError(f"prompt density has {g.shape[-1]} input latents, the map {cmap.m_in}")
    g = g.float().cpu()
    gate = top_entries(g, settings.k_prompt)
    s = cmap.scores(gate, g[gate])
    picked = top_entries(s, settings.k_diff, by_magnitude=True)
    return SteeringVector(picked, s[picked], gate, settings.alpha, settings.mode)
