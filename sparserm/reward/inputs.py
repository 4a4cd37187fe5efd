"""What the head reads, by name: a registry so the ablation is a loop, not a set of branches.

- ``topk``: SparseRM, inner products with the 2K selected decoder rows (the method).
- ``random``: inner products with 2K random unit directions (same count).
- ``raw_sae``: the SAE activations of the 2K selected latents (the paper found these worse).
- ``dense``: the pooled residual itself (DenseRM).
"""
from __future__ import annotations

from typing import Callable

import torch

from sparserm.reward.directions import project, random_directions, select_activations


def _topk(rd, h: torch.Tensor) -> torch.Tensor:
    return project(h, rd.dirs)


def _random(rd, h: torch.Tensor) -> torch.Tensor:
    return project(h, random_directions(rd.dirs.shape[1], rd.dirs.shape[0], seed=0))


def _raw_sae(rd, h: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return select_activations(rd.sae.encode(h.to(rd.sae.device)).cpu(), rd.pos_ids, rd.neg_ids)


def _dense(rd, h: torch.Tensor) -> torch.Tensor:
    return h


INPUTS: dict[str, Callable] = {"topk": _topk, "random": _random, "raw_sae": _raw_sae, "dense": _dense}


def head_inputs(name: str, rd, pairs) -> dict[str, torch.Tensor]:
    if name not in INPUTS:
        raise ValueError(f"unknown head input {name!r}: expected one of {sorted(INPUTS)}")
    fn = INPUTS[name]
    return {"x_w": fn(rd, pairs.h_w).float(), "x_l": fn(rd, pairs.h_l).float()}
