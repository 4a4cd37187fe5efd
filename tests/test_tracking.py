"""sparserm.tracking: what a Tracker logs, read back by TensorBoard's and MLflow's own readers (the training loops'
own tests check the stages: tests/reward/test_train_head.py, tests/reward/test_stage.py, tests/align/test_trainer.py,
tests/sae/test_sae.py)."""
from pathlib import Path

import numpy as np
import pytest

from sparserm.config import TrackingConfig, load_config
from sparserm.testing import mlflow_metrics, tensorboard_scalars
from sparserm.tracking import BACKENDS, Tracker, mlflow_store, node_local_store_note, tracking_spec


def _epoch(tracker: Tracker, epoch: int, losses: list[float]) -> dict:
    """Logs one epoch of ``len(losses)`` steps the way the loops do; returns its row."""
    row = {"epoch": epoch, "loss": float(np.mean(losses)), "lr": [0.1] * len(losses), "note": "x", "ok": True,
           "peak_gpu_mb": None}
    tracker.log_epoch(row, {"loss": losses}, first_step=(epoch - 1) * len(losses) + 1)
    return row


def test_config_section_defaults_and_overrides(tmp_path):
    assert load_config().tracking == TrackingConfig(tensorboard=True, mlflow_uri=None, mlflow_experiment="sparserm")
    cfg = load_config(None, ["tracking.tensorboard=false", f"tracking.mlflow_uri={tmp_path}"])
    assert not cfg.tracking.tensorboard and cfg.tracking.mlflow_uri == str(tmp_path)
    spec = tracking_spec(cfg.tracking, "rel/tb", "reward_head", {"lr": 0.1})
    assert spec["dir"] == str(Path("rel/tb").resolve()) and spec["params"] == {"stage": "reward_head", "lr": 0.1}
    assert spec["config"]["mlflow_uri"] == f"sqlite:///{tmp_path}/mlflow.db"  # a folder: a local SQLite store
    assert tracking_spec(None, tmp_path, "x") is None and set(BACKENDS) == {"tensorboard", "mlflow"}


def test_mlflow_store_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert mlflow_store("sqlite:///runs/m.db") == f"sqlite:///{tmp_path}/runs/m.db"  # absolute for the workers
    assert mlflow_store(f"sqlite:///{tmp_path}/m.db") == f"sqlite:///{tmp_path}/m.db"
    assert mlflow_store("http://mlflow:5000") == "http://mlflow:5000"
    assert mlflow_store("store") == f"sqlite:///{tmp_path}/store/mlflow.db"
    # a local store is warned about only on a cluster of two or more nodes (tests/cluster/test_multinode.py)
    assert node_local_store_note(mlflow_store("store")) is None and node_local_store_note("http://mlflow:5000") is None


def test_numbers_at_global_steps_and_a_resumed_process_does_not_log_twice(tmp_path):
    """Process 1 logs epochs 1-2 (3 steps each), then "crashes" having logged epoch 3 without its checkpoint;
    process 2 resumes at epoch 3 and logs epochs 3-4. Each step and epoch is there once, process 2's values win
    in TensorBoard (purged from its first step) and MLflow keeps what it had (it takes no step twice)."""
    log_dir, store = tmp_path / "run" / "tensorboard", str(tmp_path / "mlflow")
    spec = tracking_spec(TrackingConfig(mlflow_uri=store), log_dir, "test", {"fingerprint": "abc"})
    with Tracker(spec) as first:
        rows = [_epoch(first, 1, [3.0, 2.0, 1.0]), _epoch(first, 2, [0.9, 0.8, 0.7])]
        _epoch(first, 3, [9.0, 9.0, 9.0])  # logged, then the process died before the checkpoint
    with Tracker(spec) as resumed:
        rows += [_epoch(resumed, 3, [0.6, 0.5, 0.4]), _epoch(resumed, 4, [0.3, 0.2, 0.1])]
    step_losses = [v for losses in ([3.0, 2.0, 1.0], [0.9, 0.8, 0.7], [0.6, 0.5, 0.4], [0.3, 0.2, 0.1]) for v in losses]
    tb = tensorboard_scalars(log_dir)
    assert set(tb) == {"step/loss", "epoch/epoch", "epoch/loss"}  # numbers only: no lists, strings, bools, None
    assert tb["step/loss"] == [(i + 1, np.float32(v)) for i, v in enumerate(step_losses)]
    assert tb["epoch/loss"] == [(3 * r["epoch"], np.float32(r["loss"])) for r in rows]
    assert tb["epoch/epoch"] == [(3, 1.0), (6, 2.0), (9, 3.0), (12, 4.0)]
    ml = mlflow_metrics(store, log_dir)
    assert set(ml) == set(tb) and [s for s, _ in ml["step/loss"]] == list(range(1, 13))
    assert ml["epoch/loss"][:2] == [(3, rows[0]["loss"]), (6, rows[1]["loss"])]  # full precision
    assert ml["epoch/loss"][3] == (12, pytest.approx(rows[3]["loss"]))
    assert ml["step/loss"][3:6] == [(4, 0.9), (5, 0.8), (6, 0.7)] and ml["step/loss"][-1] == (12, 0.1)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_store(store))
    (run,) = client.search_runs([client.get_experiment_by_name("sparserm").experiment_id])  # one run, reopened
    assert run.data.params == {"stage": "test", "fingerprint": "abc"} and run.info.status == "FINISHED"
    assert run.data.tags["sparserm.log_dir"] == str(log_dir)


def test_other_ranks_and_no_spec_log_nothing_and_nothing_logged_leaves_no_files(tmp_path):
    spec = tracking_spec(TrackingConfig(), tmp_path / "tb", "test")
    assert Tracker(spec).active and not Tracker(spec, rank=1).active and not Tracker(None).active
    assert not Tracker(tracking_spec(TrackingConfig(tensorboard=False), tmp_path / "tb", "test")).active
    for tracker, metrics in ((Tracker(spec, rank=1), {"a": 1.0}), (Tracker(None), {"a": 1.0}),
                             (Tracker(spec), {"text": "x", "flag": True, "none": None})):
        with tracker:
            tracker.log(metrics, step=1)
    assert not (tmp_path / "tb").exists()  # backends open on the first number logged


def test_two_writers_in_one_second_keep_their_own_event_files(tmp_path, monkeypatch):
    """tensorboardX names an event file by the second and the host: a resumed process (or another worker) that
    opens its writer in the same second must not take the first one's file over and wipe its events."""
    from types import SimpleNamespace

    import tensorboardX.event_file_writer as event_file_writer

    monkeypatch.setattr(event_file_writer, "time", SimpleNamespace(time=lambda: 1_800_000_000.0))  # one second
    log_dir = tmp_path / "tensorboard"
    spec = tracking_spec(TrackingConfig(), log_dir, "test")
    with Tracker(spec) as first:
        _epoch(first, 1, [3.0, 2.0, 1.0])
    with Tracker(spec) as resumed:
        _epoch(resumed, 2, [0.9, 0.8, 0.7])
    files = sorted(log_dir.glob("events.out.tfevents.*"))
    assert len(files) == 2 and files[0].stat().st_mtime_ns <= files[1].stat().st_mtime_ns  # name order = open order
    losses = [3.0, 2.0, 1.0, 0.9, 0.8, 0.7]
    assert tensorboard_scalars(log_dir)["step/loss"] == [(i + 1, np.float32(v)) for i, v in enumerate(losses)]


def test_an_experiment_another_run_creates_meanwhile_is_joined(tmp_path, monkeypatch):
    # two runs on a fresh server: both found no experiment, the second create failed (RESOURCE_ALREADY_EXISTS)
    from mlflow import MlflowClient

    store = str(tmp_path / "mlflow")
    spec = tracking_spec(TrackingConfig(mlflow_uri=store), tmp_path / "run" / "tensorboard", "test")
    other = MlflowClient(tracking_uri=mlflow_store(store)).create_experiment("sparserm")  # the other run's
    real, calls = MlflowClient.get_experiment_by_name, []

    def first_lookup_misses(self, name):  # the lookup that ran before the other run's create
        calls.append(name)
        return None if len(calls) == 1 else real(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", first_lookup_misses)
    with Tracker(spec) as tracker:
        tracker.log({"loss": 1.0}, step=1)
    monkeypatch.undo()
    client = MlflowClient(tracking_uri=mlflow_store(store))
    (run,) = client.search_runs([other])
    assert run.data.metrics == {"loss": 1.0}
