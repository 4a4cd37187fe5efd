"""The warm-up schedule (sparserm.align.schedule): lr * min(1, (k + 1) / W) at optimizer step k, and a
scheduler built at a later global step continues exactly where an unbroken one is."""
import pytest
import torch

from sparserm.align.schedule import warmup_factor, warmup_scheduler


def lrs_of(make, steps: int, lr: float = 0.3) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])  # the rate this step runs at
        opt.step()
        sched.step()
    return out


def test_linear_warmup_then_constant():
    assert [warmup_factor(k, 4) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [warmup_factor(k, 0) for k in range(3)] == [1.0, 1.0, 1.0]  # 0: constant from the first step
    assert lrs_of(warmup_scheduler(4), 6) == pytest.approx([0.075, 0.15, 0.225, 0.3, 0.3, 0.3])


def test_a_scheduler_started_at_a_global_step_continues_the_unbroken_one():
    unbroken = lrs_of(warmup_scheduler(5), 8)
    assert lrs_of(warmup_scheduler(5), 3) + lrs_of(warmup_scheduler(5, start_step=3), 5) == pytest.approx(unbroken)
