"""train_head with Ray Train on CPU: learning, safetensors checkpoints, resume, two gloo workers.

Ray starts once (the session fixture ``ray_session`` of tests/conftest.py). Every ``train_head`` call costs
~8-10 s of fixed Ray Train start-up on a 2-core machine, so the module makes four calls in all.
"""
from pathlib import Path

import pytest
import torch

from sparserm.reward.head import RewardHead
from sparserm.reward.train_head import train_head

D, HIDDEN, EPOCHS = 16, 32, 4
KW = dict(hidden=HIDDEN, epochs=EPOCHS, batch_size=64, lr=1e-3, seed=0, progress=False)


def _pairs(n: int, gen: torch.Generator) -> dict:
    """Separable pairs: x_w = x_l + a fixed signal direction (+ noise); raw scales ~100 like projections."""
    x_l = torch.randn(n, D, generator=gen) * 100
    signal = torch.zeros(D)
    signal[3], signal[7] = 20.0, -10.0
    return {"x_w": x_l + signal + torch.randn(n, D, generator=gen) * 5, "x_l": x_l}


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    return _pairs(400, gen), _pairs(100, gen)


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("head-runs")


@pytest.fixture(scope="module")
def full_run(ray_session, data, storage):
    train, val = data
    return train_head(train, val, storage_dir=storage, name="full", **KW)


def test_learns_separable_problem(full_run):
    r = full_run
    assert [h["epoch"] for h in r.history] == [1, 2, 3, 4]
    assert r.finished and r.start_epoch == 1
    assert max(h["val_accuracy"] for h in r.history) > 0.9
    best = max(r.history, key=lambda h: (h["val_accuracy"], -h["val_loss"]))
    assert r.best_epoch == best["epoch"]
    # the returned head is the best epoch's head and it changed from its initialisation
    torch.manual_seed(0)
    init = RewardHead(D, HIDDEN)
    assert not torch.equal(init.net[0].weight, r.head.net[0].weight)
    assert not torch.equal(init.net[2].weight, r.head.net[2].weight)
    assert r.head.x_std.min() > 50  # standardisation buffers came back with the weights


def test_checkpoint_is_safetensors_and_json_only(full_run):
    ckpt = full_run.checkpoint_dir
    assert ckpt.name == "epoch_0004"
    files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
    assert files == ["best/head.json", "best/head.safetensors", "last/head.json", "last/head.safetensors",
                     "optimizer.safetensors", "state.json"]


def test_resume_continues_from_last_finished_epoch(data, storage, full_run):
    train, val = data
    first = train_head(train, val, storage_dir=storage, name="resumed", stop_after_epoch=2, **KW)
    assert [h["epoch"] for h in first.history] == [1, 2] and not first.finished
    second = train_head(train, val, storage_dir=storage, name="resumed", **KW)
    assert second.start_epoch == 3  # epochs 1-2 were restored from the checkpoint, not retrained
    assert [h["epoch"] for h in second.history] == [1, 2, 3, 4] and second.finished
    assert second.history[:2] == first.history
    # with optimizer state and per-epoch shuffles restored, the resumed run matches an uninterrupted one
    for got, want in zip(second.history, full_run.history):
        for key in ("train_loss", "val_loss", "val_accuracy"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6)
    assert second.best_epoch == full_run.best_epoch


def test_two_gloo_workers(data, storage):
    train, val = data
    r = train_head(train, val, storage_dir=storage, name="ddp2", num_workers=2, **KW)
    assert [h["epoch"] for h in r.history] == [1, 2, 3, 4]
    assert max(h["val_accuracy"] for h in r.history) > 0.9
    assert r.history[-1]["train_loss"] < r.history[0]["train_loss"]


def test_refuses_to_resume_a_run_with_other_settings(data, tmp_path):
    """Checked on the driver before Ray Train starts (the workers check again)."""
    import json

    ckpt = tmp_path / "old" / "epoch_0002"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"epoch": 2, "fingerprint": {"in_dim": D, "hidden": 999}}))
    train, val = data
    with pytest.raises(ValueError, match="other settings.*hidden"):
        train_head(train, val, storage_dir=tmp_path, name="old", **KW)
    with pytest.raises(ValueError, match="unknown loss"):
        train_head(train, val, storage_dir=tmp_path, name="new", loss="hinge", **KW)
