"""The reward head's Ray Train worker killed (SIGKILL) mid-run, after epoch 1's checkpoint: ``FailureConfig``
restarts the worker group from the last checkpoint, and the run ends as an unbroken one with the same seed does."""
import pytest
import torch

from sparserm.reward.train_head import train_head
from tests.faults import during, gone, kill_train_worker_after

D, EPOCHS = 16, 5
# every epoch's report waits for a controller poll: 0.5 s polls give epochs 2-5 two seconds at least, so the kill,
# sent once epoch 1's checkpoint is registered, lands while the run still trains
KW = dict(hidden=32, epochs=EPOCHS, batch_size=32, lr=1e-3, seed=0, progress=False, poll_interval_s=0.5)


def _pairs(n: int, gen: torch.Generator) -> dict:
    x_l = torch.randn(n, D, generator=gen) * 10
    return {"x_w": x_l + torch.randn(n, D, generator=gen) + 1.0, "x_l": x_l}


def test_a_worker_killed_mid_run_restarts_from_the_last_checkpoint_and_ends_as_an_unbroken_run(ray_session, tmp_path):
    gen = torch.Generator().manual_seed(0)
    train, val = _pairs(256, gen), _pairs(64, gen)
    broken, (pid, registered, state) = during(
        lambda: train_head(train, val, storage_dir=tmp_path, name="killed", max_failures=1, **KW),
        lambda: kill_train_worker_after(tmp_path / "killed", epoch=1))
    assert gone(pid) and 1 <= registered < EPOCHS
    # the run's last worker group started from a checkpoint (a fresh run starts at 1) and still trained epochs
    assert registered < broken.start_epoch <= EPOCHS and broken.finished
    assert broken.history[:registered] == state["history"]

    unbroken = train_head(train, val, storage_dir=tmp_path, name="unbroken", **KW)
    assert unbroken.start_epoch == 1 and [h["epoch"] for h in broken.history] == list(range(1, EPOCHS + 1))
    for got, want in zip(broken.history, unbroken.history, strict=True):
        for key in ("train_loss", "val_loss", "val_accuracy"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7)
    assert broken.best_epoch == unbroken.best_epoch
    for (name, a), (_, b) in zip(broken.head.state_dict().items(), unbroken.head.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
