"""SAE quality on held-out activations, and the massive-activation mask."""
from __future__ import annotations

import torch

from sparserm.sae.autoencoder import SparseAutoencoder

CHUNK = 4096


def massive_token_mask(acts: torch.Tensor, factor: float = 10.0) -> torch.Tensor:
    """True where ||h|| > factor x median ||h|| (SmolLM2's newline tokens sit near 100x the median)."""
    norms = acts.float().norm(dim=-1)
    return norms > factor * norms.median()


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, acts: torch.Tensor, massive_mask: torch.Tensor | None = None) -> dict:
    """``fvu`` = sum ||h - decode(encode(h))||^2 / sum ||h - mean h||^2 over non-massive tokens (headline);
    ``fvu_all`` over every token; ``l0`` mean active latents per (non-massive) token; ``dead_fraction``
    share of latents never active on the evaluated non-massive tokens."""
    if len(acts) == 0:
        raise ValueError("no activations to evaluate the SAE on")
    massive = torch.zeros(len(acts), dtype=torch.bool) if massive_mask is None else massive_mask.bool()
    if int((~massive).sum()) < 2:
        raise ValueError(f"{int((~massive).sum())} of the {len(acts)} evaluation tokens are not massive: the FVU "
                         "needs at least 2 (a variance over tokens); give the pass more texts or a larger token "
                         "sample, or raise features.outlier_norm_factor")
    sums = {"err": 0.0, "err_all": 0.0, "l0": 0.0}
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    for start in range(0, len(acts), CHUNK):
        h = acts[start: start + CHUNK].float()
        m = massive[start: start + CHUNK]
        f = sae.encode(h).cpu()
        err = (h - sae.decode(f).cpu()).pow(2).sum(-1)
        sums["err_all"] += float(err.sum())
        sums["err"] += float(err[~m].sum())
        sums["l0"] += float((f[~m] > 0).sum())
        fired |= (f[~m] > 0).any(0)
    kept = acts[~massive].float()
    var = float((kept - kept.mean(0)).pow(2).sum())
    var_all = float((acts.float() - acts.float().mean(0)).pow(2).sum())
    n = int((~massive).sum())
    return {"fvu": sums["err"] / var, "fvu_all": sums["err_all"] / var_all, "l0": sums["l0"] / max(n, 1),
            "dead_fraction": float((~fired).float().mean()), "n_tokens": n, "n_massive": int(massive.sum())}
