"""The DPO Ray Train worker killed (SIGKILL) mid-run, after epoch 1's checkpoint: ``run.max_failures`` lets
``FailureConfig`` restart the worker group from the last checkpoint, and the run ends as an unbroken one with the
same seed does (losses, learning rates, the adapter)."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.faults import during, gone, kill_train_worker_after

EPOCHS = 3


def test_a_worker_killed_mid_run_restarts_from_the_last_checkpoint_and_ends_as_an_unbroken_run(
        tiny_align_config, ray_session, tmp_path, dpo_pairs):
    from sparserm.align.trainer import train_dpo

    cfg = tiny_align_config(f"align.train.epochs={EPOCHS}", "align.train.lr=5e-3", "align.train.warmup_steps=3",
                            "run.max_failures=1")
    broken, (pid, registered, state) = during(
        lambda: train_dpo(cfg, dpo_pairs, storage_dir=tmp_path, name="killed", progress=False),
        lambda: kill_train_worker_after(tmp_path / "killed", epoch=1))
    assert gone(pid) and 1 <= registered < EPOCHS
    hist = broken["history"]
    assert broken["finished"] and [h["epoch"] for h in hist] == list(range(1, EPOCHS + 1))
    # the epochs of the checkpoint the restarted group resumed from were not redone: their rows are the ones stored
    # then, timings included (a run redone from scratch would time its steps anew)
    assert hist[:registered] == state["history"]

    unbroken = train_dpo(cfg, dpo_pairs, storage_dir=tmp_path, name="unbroken", progress=False)
    want = unbroken["history"]
    assert [h["loss"] for h in hist] == pytest.approx([h["loss"] for h in want], rel=1e-5)
    assert [h["lr"] for h in hist] == [h["lr"] for h in want] and [h["global_step"] for h in hist] == [2, 4, 6]
    a = load_file(str(Path(broken["adapter"]) / "adapter_model.safetensors"))
    b = load_file(str(Path(unbroken["adapter"]) / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
