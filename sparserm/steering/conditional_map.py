"""The conditional-difference map of DSPA-style steering (SPEC section 6), in pure torch: no model, no files.

From N preference triples (x, y_w, y_l):

- ``g(x)_i``: the input SAE's activation density on the prompt, the share of the prompt's own tokens on which
  latent i is active (> 0);
- ``rho(y)_j``: the output SAE's activation density over a response's own tokens (never padding), and
  ``drho = rho(y_w) - rho(y_l)``;
- ``A = (1/N) sum_n g(x_n) drho_n^T``, [m_in, m_out], then sparsified by an entry of ``SPARSIFIERS``
  (``steer.sparsifier``), each a function ``(A, steer_cfg) -> keep mask`` that names the ``steer`` fields it reads
  (they, and only they, enter the map's key).

The sparse map is a :class:`ConditionalMap`: CSR over the input latents (row i: the output latents input latent i
moves and by how much), the layout decoding reads (the prompt gate keeps a few rows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

ROW_CHUNK = 1024  # rows of A sorted at once by top_per_row (a 16k x 16k map never sorted whole)


def activation_density(acts: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Share of the (masked) tokens on which each latent is active: ``acts`` [..., T, m] SAE activations, ``mask``
    [..., T] (nonzero: a real token of the text) -> [..., m] float32. A text with no token is an error."""
    active = (acts > 0).float()
    if mask is None:
        mask = torch.ones(active.shape[:-1], device=active.device)
    m = mask.to(active.dtype)
    n = m.sum(-1, keepdim=True)
    if bool((n == 0).any()):
        raise ValueError("activation_density: a text with no tokens has no activation density")
    return (active * m.unsqueeze(-1)).sum(-2) / n


def conditional_difference_map(g: torch.Tensor, drho: torch.Tensor) -> torch.Tensor:
    """``A = (1/N) sum_n g_n drho_n^T`` from prompt densities ``g`` [N, m_in] and density differences ``drho``
    [N, m_out]: [m_in, m_out] float32."""
    if g.ndim != 2 or drho.ndim != 2 or g.shape[0] != drho.shape[0]:
        raise ValueError(f"conditional_difference_map: g {tuple(g.shape)} and drho {tuple(drho.shape)} must be "
                         "[N, m_in] and [N, m_out] for the same N")
    if g.shape[0] == 0:
        raise ValueError("conditional_difference_map: no triples")
    return (g.float().T @ drho.float()) / g.shape[0]


@dataclass(frozen=True)
class Sparsifier:
    keep: Callable[[torch.Tensor, object], torch.Tensor]  # (A, steer_cfg) -> bool mask [m_in, m_out]
    settings: tuple[str, ...]  # the steer fields it reads


def _top_per_row(A: torch.Tensor, cfg) -> torch.Tensor:
    """The ``steer.top_per_row`` entries of each row largest in |A_ij| (nonzero ones; ties: the lower index)."""
    k = min(int(cfg.top_per_row), A.shape[1])
    keep = torch.zeros(A.shape, dtype=torch.bool, device=A.device)
    for start in range(0, A.shape[0], ROW_CHUNK):
        part = A[start:start + ROW_CHUNK].abs()
        top = torch.sort(part, dim=1, descending=True, stable=True).indices[:, :k]
        keep[start:start + ROW_CHUNK].scatter_(1, top, True)
    return keep & (A != 0)


def _threshold(A: torch.Tensor, cfg) -> torch.Tensor:
    """The entries with |A_ij| > ``steer.threshold``."""
    return A.abs() > float(cfg.threshold)


SPARSIFIERS: dict[str, Sparsifier] = {
    "top_per_row": Sparsifier(_top_per_row, ("top_per_row",)),
    "threshold": Sparsifier(_threshold, ("threshold",)),
}


def sparsifier_key(cfg) -> dict:
    """The sparsifier's name and the ``steer`` settings it reads (a setting it does not read never changes a key)."""
    if cfg.sparsifier not in SPARSIFIERS:
        raise ValueError(f"steer.sparsifier={cfg.sparsifier!r} is unknown: expected one of {sorted(SPARSIFIERS)}")
    return {"name": cfg.sparsifier, **{f: getattr(cfg, f) for f in SPARSIFIERS[cfg.sparsifier].settings}}


@dataclass
class ConditionalMap:
    """A sparse [m_in, m_out] map in CSR: row i holds output latents ``indices[indptr[i]:indptr[i+1]]`` (ascending)
    with ``values`` at the same positions."""

    indptr: torch.Tensor  # int64 [m_in + 1]
    indices: torch.Tensor  # int64 [nnz]
    values: torch.Tensor  # float32 [nnz]
    m_out: int

    @property
    def m_in(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return len(self.values)

    @classmethod
    def from_dense(cls, A: torch.Tensor, keep: torch.Tensor | None = None) -> "ConditionalMap":
        """The entries of ``A`` where ``keep`` (default: every nonzero)."""
        keep = (A != 0) if keep is None else keep & (A != 0)
        rows, cols = keep.nonzero(as_tuple=True)  # row-major order: rows ascending, then cols
        counts = torch.bincount(rows, minlength=A.shape[0])
        indptr = torch.cat([torch.zeros(1, dtype=torch.long, device=A.device), counts.cumsum(0)])
        return cls(indptr.cpu(), cols.cpu(), A[rows, cols].float().cpu(), int(A.shape[1]))

    def dense(self) -> torch.Tensor:
        rows = torch.repeat_interleave(torch.arange(self.m_in), self.indptr.diff())
        out = torch.zeros(self.m_in, self.m_out)
        out[rows, self.indices] = self.values
        return out

    def scores(self, gate: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``s = A^T g_gated`` [m_out] for a gated prompt density: ``weights`` [k] at input latents ``gate`` [k]
        (every other entry of g zero), so only the gate's rows are read."""
        gate = gate.long().cpu()
        start, lens = self.indptr[gate], self.indptr[gate + 1] - self.indptr[gate]
        owner = torch.repeat_interleave(torch.arange(len(gate)), lens)
        pos = torch.arange(int(lens.sum())) - torch.repeat_interleave(lens.cumsum(0) - lens, lens) + start[owner]
        s = torch.zeros(self.m_out)
        return s.index_add_(0, self.indices[pos], self.values[pos] * weights.float().cpu()[owner])

    def tensors(self) -> dict[str, torch.Tensor]:
        """For ``safetensors`` (``m_out`` as a one-element tensor)."""
        return {"indptr": self.indptr.contiguous(), "indices": self.indices.contiguous(),
                "values": self.values.contiguous(), "m_out": torch.tensor([self.m_out], dtype=torch.long)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "ConditionalMap":
        return cls(t["indptr"].long(), t["indices"].long(), t["values"].float(), int(t["m_out"][0]))


def sparsify(A: torch.Tensor, cfg) -> ConditionalMap:
    """``A`` kept where ``steer.sparsifier`` says (``cfg``: a ``SteerConfig``)."""
    sparsifier_key(cfg)  # a known name
    return ConditionalMap.from_dense(A, SPARSIFIERS[cfg.sparsifier].keep(A, cfg))
