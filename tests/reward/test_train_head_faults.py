"""The reward heads' Ray Train worker killed (SIGKILL) mid-run, in a run of two heads, once the first head's last
epoch is checkpointed: ``FailureConfig`` restarts the worker group from the last checkpoint, the finished head is
restored (not retrained) and the run ends as an unbroken one with the same seeds does."""
import pytest
import torch

from sparserm.reward.train_head import HeadJob, train_heads
from tests.faults import during, gone, kill_train_worker_after

D, EPOCHS = 16, 4
# every epoch's report waits for a controller poll: 0.5 s polls give the second head's four epochs two seconds at
# least, so the kill, sent once the first head's last checkpoint is registered, lands while the run still trains
KW = dict(hidden=32, epochs=EPOCHS, batch_size=32, lr=1e-3, progress=False, poll_interval_s=0.5)


def _pairs(n: int, gen: torch.Generator) -> dict:
    x_l = torch.randn(n, D, generator=gen) * 10
    return {"x_w": x_l + torch.randn(n, D, generator=gen) + 1.0, "x_l": x_l}


def test_a_worker_killed_mid_run_restarts_from_the_last_checkpoint_and_ends_as_an_unbroken_run(ray_session, tmp_path):
    gen = torch.Generator().manual_seed(0)
    train, val = _pairs(256, gen), _pairs(64, gen)
    jobs = [HeadJob("a", train, val, seed=0), HeadJob("b", train, val, loss="bt", seed=1)]
    broken, (pid, registered, state) = during(
        lambda: train_heads(jobs, storage_dir=tmp_path, name="killed", max_failures=1, **KW),
        lambda: kill_train_worker_after(tmp_path / "killed", epoch=EPOCHS))
    assert gone(pid) and EPOCHS <= registered < 2 * EPOCHS  # reports: a's epochs, then b's
    a, b = broken
    # the last worker group started from a checkpoint holding a finished: a was restored, b continued where it was
    assert a.start_epoch == EPOCHS + 1 and b.start_epoch == registered - EPOCHS + 1 and a.finished and b.finished
    assert (state["job"], state["history"] if state["job"] == "a" else state["done"]["a"]["history"]) == (
        "a" if registered == EPOCHS else "b", a.history)

    unbroken = train_heads(jobs, storage_dir=tmp_path, name="unbroken", **KW)
    for got_run, want_run in zip(broken, unbroken, strict=True):
        assert want_run.start_epoch == 1 and [h["epoch"] for h in got_run.history] == list(range(1, EPOCHS + 1))
        for got, want in zip(got_run.history, want_run.history, strict=True):
            for key in ("train_loss", "val_loss", "val_accuracy"):
                assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7)
        assert got_run.best_epoch == want_run.best_epoch
        for (name, x), (_, y) in zip(got_run.head.state_dict().items(), want_run.head.state_dict().items(), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=name)
    assert a.history != b.history
