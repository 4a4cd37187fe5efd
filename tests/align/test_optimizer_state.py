"""DPO optimizer moments saved per rank as safetensors + JSON and loaded back."""
import pytest
import torch

from sparserm.align.optimizer_state import load_optimizer_state, save_optimizer_state


def _stepped_adamw(seed: int) -> tuple[torch.nn.Linear, torch.optim.AdamW]:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, betas=(0.8, 0.95))
    for _ in range(3):
        lin(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return lin, opt


def test_round_trip_restores_moments_and_steps(tmp_path):
    _, saved = _stepped_adamw(0)
    save_optimizer_state(saved, tmp_path / "optimizer", rank=1, world=2, stage=2)
    assert sorted(p.name for p in (tmp_path / "optimizer").iterdir()) == ["rank_1.json", "rank_1.safetensors"]

    lin, fresh = _stepped_adamw(1)  # same shapes, other values
    assert load_optimizer_state(fresh, tmp_path / "optimizer", rank=1, world=2, stage=2) is None
    want, got = saved.state_dict(), fresh.state_dict()
    assert tuple(got["param_groups"][0]["betas"]) == (0.8, 0.95)
    for i in want["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(got["state"][i][name], want["state"][i][name]), (i, name)
    # the parameters it steps are restored too (ZeRO's fp32 master copy), so the next step is the same
    saved_params = [p for g in saved.param_groups for p in g["params"]]
    fresh_params = [p for g in fresh.param_groups for p in g["params"]]
    assert all(torch.equal(a, b) for a, b in zip(saved_params, fresh_params))
    for opt in (saved, fresh):
        for p in (p for g in opt.param_groups for p in g["params"]):
            p.grad = torch.ones_like(p)
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(saved_params, fresh_params))


def test_other_world_size_stage_or_rank_is_refused(tmp_path):
    _, opt = _stepped_adamw(0)
    save_optimizer_state(opt, tmp_path, rank=0, world=2, stage=2)
    _, other = _stepped_adamw(1)
    keep = other.state_dict()["state"][0]["exp_avg"].clone()
    assert "2 worker(s) at ZeRO stage 2" in load_optimizer_state(other, tmp_path, rank=0, world=1, stage=2)
    assert "this run has 2 at stage 3" in load_optimizer_state(other, tmp_path, rank=0, world=2, stage=3)
    assert "rank 1" in load_optimizer_state(other, tmp_path, rank=1, world=2, stage=2)
    assert torch.equal(other.state_dict()["state"][0]["exp_avg"], keep)  # untouched when refused
