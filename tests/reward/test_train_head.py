"""train_head with Ray Train on CPU: learning, safetensors checkpoints, resume, two gloo workers.

Ray starts once (the session fixture ``ray_session`` of tests/conftest.py). Every ``train_head`` call costs
~8-10 s of fixed Ray Train start-up on a 2-core machine, so the module makes few calls; ``train_heads`` pays it
once for several heads.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from sparserm.config import TrackingConfig
from sparserm.reward.head import RewardHead
from sparserm.reward.train_head import HeadJob, train_head, train_heads
from sparserm.testing import mlflow_metrics, tensorboard_scalars

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
                     "optimizer/rank_0.json", "optimizer/rank_0.safetensors", "state.json"]


def test_resume_continues_from_last_finished_epoch(data, storage, full_run, tmp_path):
    train, val = data
    tracking = TrackingConfig(mlflow_uri=str(tmp_path / "mlflow"))  # and TensorBoard, the default
    first = train_head(train, val, storage_dir=storage, name="resumed", stop_after_epoch=2, tracking=tracking, **KW)
    assert [h["epoch"] for h in first.history] == [1, 2] and not first.finished
    second = train_head(train, val, storage_dir=storage, name="resumed", tracking=tracking, **KW)
    assert second.start_epoch == 3  # epochs 1-2 were restored from the checkpoint, not retrained
    assert [h["epoch"] for h in second.history] == [1, 2, 3, 4] and second.finished
    assert second.history[:2] == first.history
    # with optimizer state and per-epoch shuffles restored, the resumed run matches an uninterrupted one
    for got, want in zip(second.history, full_run.history):
        for key in ("train_loss", "val_loss", "val_accuracy"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6)
    assert second.best_epoch == full_run.best_epoch

    # what rank 0 logged, read back by TensorBoard and MLflow: the run's own history, each step and epoch once (the
    # resumed process logged epochs 3-4 only), at global steps (400 pairs, batch 64: 7 steps an epoch)
    log_dir = storage / "resumed" / "tensorboard"
    tb, ml = tensorboard_scalars(log_dir), mlflow_metrics(tracking.mlflow_uri, log_dir)
    assert {len(h["step_loss"]) for h in second.history} == {7}
    losses = [v for h in second.history for v in h["step_loss"]]
    assert tb["step/loss"] == [(i + 1, np.float32(v)) for i, v in enumerate(losses)]  # TensorBoard: float32
    assert ml["step/loss"] == [(i + 1, v) for i, v in enumerate(losses)]
    for key in ("epoch", "train_loss", "val_loss", "val_accuracy"):
        assert tb[f"epoch/{key}"] == [(7 * h["epoch"], np.float32(h[key])) for h in second.history]
        assert ml[f"epoch/{key}"] == [(7 * h["epoch"], h[key]) for h in second.history]
    assert [v for _, v in ml["epoch/best_epoch"]][-1] == second.best_epoch


def test_several_heads_in_one_run_each_equal_their_own_run_and_a_rerun_trains_nothing(data, storage, full_run):
    train, val = data
    narrow = {k: v[:, :8] for k, v in train.items()}, {k: v[:, :8] for k, v in val.items()}
    jobs = [HeadJob("b", train, val, loss="bt", seed=1), HeadJob("a", train, val, seed=0), HeadJob("c", *narrow, seed=2)]
    kw = {k: v for k, v in KW.items() if k != "seed"}
    b, a, c = train_heads(jobs, storage_dir=storage, name="many", **kw)
    # "a" has full_run's settings: trained after another head in the same workers, it is the head of its own run
    assert a.history == full_run.history and a.best_epoch == full_run.best_epoch
    for k, v in full_run.head.state_dict().items():
        assert torch.equal(a.head.state_dict()[k], v), k
    assert b.history != a.history and c.head.in_dim == 8 and all(r.finished and r.start_epoch == 1 for r in (a, b, c))
    # one checkpoint, of the last report: the last job's state, the finished jobs' best heads
    ckpt = c.checkpoint_dir
    assert ckpt.name == f"epoch_{3 * EPOCHS:04d}" and (a.checkpoint_dir, b.checkpoint_dir) == (ckpt / "done" / "a",
                                                                                                ckpt / "done" / "b")
    files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
    assert files == ["best/head.json", "best/head.safetensors", *[f"done/{j}/best/head.{e}" for j in "ab"
                                                                     for e in ("json", "safetensors")],
                     "last/head.json", "last/head.safetensors", "optimizer/rank_0.json",
                     "optimizer/rank_0.safetensors", "state.json"]
    again = train_heads(jobs, storage_dir=storage, name="many", **kw)  # resumed: every job is done
    assert [r.start_epoch for r in again] == [EPOCHS + 1] * 3 and [r.history for r in again] == [b.history,
                                                                                                  a.history, c.history]
    assert all(torch.equal(r.head.net[0].weight, f.head.net[0].weight) for r, f in zip(again, (b, a, c)))
    with pytest.raises(ValueError, match=r"other settings: b\.seed"):
        train_heads([HeadJob("b", train, val, loss="bt", seed=5), *jobs[1:]], storage_dir=storage, name="many", **kw)
    with pytest.raises(ValueError, match="distinct names"):
        train_heads([jobs[0], jobs[0]], storage_dir=storage, name="twice", **kw)
    with pytest.raises(ValueError, match="one job"):
        train_heads(jobs, storage_dir=storage, name="stopped", stop_after_epoch=1, **kw)


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


def test_early_stopping_returns_the_best_head_and_a_resumed_run_stops_at_the_same_epoch(ray_session, data,
                                                                                        tmp_path):
    """Validation pairs whose preference is the training signal reversed: the better the head learns, the worse
    its val accuracy and the higher its val loss, so the best epoch is the first and patience 2 stops after
    epoch 3 of 8. Interrupted after epoch 2 (as an unbroken run is there) and resumed, it stops at 3 all the same
    (the stopper replays the stored history) and returns epoch 1's head."""
    from sparserm.reward.accuracy import pair_accuracy
    from sparserm.reward.losses import get_loss

    train, _ = data
    gen = torch.Generator().manual_seed(1)
    val = {"x_w": (v := _pairs(60, gen))["x_l"], "x_l": v["x_w"]}  # reversed
    kw = {**KW, "epochs": 8, "lr": 1e-2, "patience": 2}
    first = train_head(train, val, storage_dir=tmp_path, name="es", stop_after_epoch=2, **kw)
    assert not first.finished and first.stopped_early_at is None and first.best_epoch == 1
    r = train_head(train, val, storage_dir=tmp_path, name="es", **kw)
    rows = r.history
    assert r.start_epoch == 3 and r.stopped_early_at == 3 and r.finished and [h["epoch"] for h in rows] == [1, 2, 3]
    assert rows[:2] == first.history and rows[-1]["stopped_early_at"] == 3
    assert r.best_epoch == 1 and rows[2]["val_loss"] > rows[1]["val_loss"] > rows[0]["val_loss"]
    assert rows[2]["val_accuracy"] <= rows[0]["val_accuracy"]
    with torch.no_grad():  # the returned head is epoch 1's, not the last one
        s_w, s_l = r.head(val["x_w"]), r.head(val["x_l"])
    assert pair_accuracy(s_w, s_l) == pytest.approx(rows[0]["val_accuracy"])
    assert get_loss("margin")(s_w, s_l, margin=1.0).item() == pytest.approx(rows[0]["val_loss"], rel=1e-5)
