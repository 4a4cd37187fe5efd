"""The SparseRM reward head (SPEC §2.5) and its safetensors + JSON storage (never pickle).

``RewardHead``: standardise → Linear(in_dim, hidden) → ReLU → Linear(hidden, 1), output shape [N].
Raw projections onto decoder rows have scales of hundreds, so inputs are standardised with the mean and
std of the training inputs; both are buffers (``x_mean``, ``x_std``) and are saved with the weights.
A head folder holds ``head.safetensors`` (all parameters and buffers) and ``head.json`` (shapes, format).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sparserm.reward.accuracy import pair_accuracy  # noqa: F401  (re-exported for convenience)

__all__ = ["RewardHead", "save_head", "load_head", "head_state", "HEAD_FORMAT", "pair_accuracy"]

HEAD_FORMAT = "sparserm-head/1"
WEIGHTS_FILE = "head.safetensors"
META_FILE = "head.json"


class RewardHead(nn.Module):
    def __init__(self, in_dim: int, hidden: int = 512, std_floor: float = 1e-6):
        super().__init__()
        self.in_dim, self.hidden, self.std_floor = int(in_dim), int(hidden), float(std_floor)
        self.register_buffer("x_mean", torch.zeros(self.in_dim))
        self.register_buffer("x_std", torch.ones(self.in_dim))
        self.net = nn.Sequential(nn.Linear(self.in_dim, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1))

    @torch.no_grad()
    def fit_standardization(self, x: torch.Tensor) -> "RewardHead":
        """Set ``x_mean``/``x_std`` from training inputs ``x`` [N, in_dim] (pass chosen and rejected rows
        together). Constant columns get std 1 instead of ~0 (a floor keeps them from exploding)."""
        x = torch.as_tensor(x, dtype=torch.float64)
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"expected inputs [N, {self.in_dim}], got {tuple(x.shape)}")
        mean = x.mean(0)
        std = x.std(0, unbiased=False) if x.shape[0] > 1 else torch.ones_like(mean)
        std = torch.where(std > self.std_floor, std, torch.ones_like(std))
        self.x_mean.copy_(mean.float())
        self.x_std.copy_(std.float())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.to(self.x_mean.dtype) - self.x_mean) / self.x_std
        return self.net(z).squeeze(-1)


def head_state(head: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of every parameter and buffer (unwraps DDP's ``.module``)."""
    head = getattr(head, "module", head)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in head.state_dict().items()}


def save_head(head: RewardHead, out: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``head`` (or ``state``, a :func:`head_state` dict of the same architecture) into folder ``out``."""
    module = getattr(head, "module", head)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state if state is not None else head_state(module), str(out / WEIGHTS_FILE))
    meta = {"format": HEAD_FORMAT, "in_dim": module.in_dim, "hidden": module.hidden, "std_floor": module.std_floor}
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return out


def load_head(path: str | Path, device: str | torch.device = "cpu") -> RewardHead:
    path = Path(path)
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a reward-head folder (no {META_FILE})")
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("format") != HEAD_FORMAT:
        raise ValueError(f"{path}/{META_FILE}: unknown format {meta.get('format')!r}, expected {HEAD_FORMAT}")
    head = RewardHead(meta["in_dim"], meta["hidden"], meta.get("std_floor", 1e-6))
    head.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=True)
    return head.to(device)
