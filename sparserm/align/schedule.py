"""The learning-rate schedule of DPO-style training: linear warm-up over ``align.train.warmup_steps`` optimizer
steps, then constant (the FPO paper: 150 steps, then constant).

Optimizer step k (0-based, counted over the whole run, not the epoch) runs at ``lr * warmup_factor(k, W)`` =
``lr * min(1, (k + 1) / W)``; W = 0 is a constant lr. The scheduler is a torch ``LambdaLR`` handed to
``deepspeed.initialize``, which steps it after every optimizer step; a resumed run builds it at the global
step it stopped at (``start_step``), so it continues at the rate an unbroken run would have.
"""
from __future__ import annotations

import torch


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The multiplier of lr at optimizer step ``step`` (0-based)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def warmup_scheduler(warmup_steps: int, start_step: int = 0):
    """A callable ``optimizer -> LambdaLR`` (what DeepSpeed's ``lr_scheduler`` argument takes) whose first step
    is global step ``start_step``."""
    def make(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_factor(start_step + s, warmup_steps))

    return make
