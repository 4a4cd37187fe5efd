"""Ray Train run plumbing shared by every training stage (reward head, DPO/FPO; ``ensure_ray`` also for the
features, steering and FPO passes that start Ray): starting or joining Ray, the run's ``RunConfig`` (storage,
failures, logging), the fit with a polling interval, and the finished run's checkpoint folder."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

__all__ = ["ensure_ray", "PLACEMENT_RETRIES", "failure_config", "run_config", "quiet_worker_logs",
           "final_checkpoint", "fit_polling"]


def ensure_ray(address: str | None = None, log_to_driver: bool = True) -> None:
    """Start (or join) Ray once per process; the first caller's ``log_to_driver`` holds for the process (the
    features stage turns the actors' output off: its one progress bar is the driver's). A local instance gets
    its dashboard where it can start one: Ray Train's placement-group cleaner asks the State API (the
    dashboard's) whether the run's controller lives, and without one it prints a warning every few seconds for
    the whole run."""
    import ray
    from ray._private.services import canonicalize_bootstrap_address

    if ray.is_initialized():
        return
    # a cluster to join (the address, RAY_ADDRESS, the `ray start` cluster of this machine)? Any address given,
    # here or in RAY_ADDRESS (a Ray Client URI too), is ray.init's to take or to refuse with its own message
    given = address if address not in (None, "auto") else os.environ.get("RAY_ADDRESS") or None
    if address != "local" and (given is not None or canonicalize_bootstrap_address(address) is not None):
        ray.init(address=address, include_dashboard=None, log_to_driver=log_to_driver)
        return
    with _workers_know_their_cluster():
        ray.init(address="local", include_dashboard=None, log_to_driver=log_to_driver)


@contextmanager
def _workers_know_their_cluster():
    """Starts a local instance on a free GCS port that its processes find in ``RAY_ADDRESS`` (the raylet and its
    workers take the driver's environment when they start; the driver's is restored after). A process of a local
    instance that asks the State API without an address (Ray Train's placement-group cleaner does) otherwise
    looks for "the" Ray on the machine and, with a second instance running there (a `ray start` cluster, another
    local run), fails with "Found multiple active Ray instances"."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    os.environ.update(RAY_ADDRESS=f"127.0.0.1:{port}", RAY_GCS_SERVER_PORT=str(port))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# Ray Train retries a worker group it cannot place (60 s each, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S) without
# end by default; after this many tries (~10 min) the run fails, naming the resources it waited for
PLACEMENT_RETRIES = 10


def failure_config(max_failures: int):
    """Ray Train's ``FailureConfig``: ``max_failures`` worker-group failures (``run.max_failures``; -1: no limit)
    recovered from the latest checkpoint, and a bounded wait for placement."""
    from ray.train import FailureConfig

    return FailureConfig(max_failures=max_failures, controller_failure_limit=PLACEMENT_RETRIES)


def run_config(storage_dir: Path, name: str, max_failures: int):
    """Ray Train's ``RunConfig`` of a run kept in ``storage_dir/name`` (a folder inside a storage URI's mirror:
    on that URI, so workers on any node write their checkpoints there), one checkpoint kept. Ray Train's own
    INFO lines (placement requests, worker group starts, every checkpoint and report) stay in its log files in
    the Ray session folder; warnings and errors still reach the console beside the run's progress lines."""
    from ray.train import CheckpointConfig, LoggingConfig, RunConfig

    from sparserm.storage import train_storage

    path, fs = train_storage(Path(storage_dir))
    # the print patch logs each worker print again through Ray Train's logger: every progress line came twice
    return RunConfig(storage_path=path, storage_filesystem=fs, name=name, failure_config=failure_config(max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=1), logging_config=LoggingConfig("WARNING"),
                     worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}})


def quiet_worker_logs() -> None:
    """In a Ray worker process (a Ray Train worker, an engine actor), before it loads a model: transformers'
    "Loading weights" bars off (each an empty line in the driver's console), DeepSpeed told it runs on the CPU
    where CUDA is absent (else its import warns that it found no accelerator), and Ray Train's INFO line for
    every report off the console (its module logs under its file's path, not ``ray.train``, so ``LoggingConfig``
    does not reach it; it stays in the worker's log file)."""
    import logging
    import sys

    import torch
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # transformers takes its setting from here when it is first imported
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when DeepSpeed is first imported
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def final_checkpoint(result, storage_dir: Path, name: str, what: str) -> Path:
    """The local folder of a finished fit's latest checkpoint (brought down from the storage URI first, when the
    run lives on one); RuntimeError naming the run when no epoch finished."""
    from sparserm.storage import sync_down

    if result.checkpoint is None:
        raise RuntimeError(f"{what} {name!r}: no epoch finished, so there is no checkpoint")
    run_dir = Path(storage_dir) / name
    sync_down(run_dir)
    local = run_dir / Path(result.checkpoint.path).name
    return local if local.is_dir() else Path(result.checkpoint.path)


def fit_polling(trainer, poll_interval_s: float):
    """``trainer.fit()`` with Ray Train's controller polling workers every ``poll_interval_s`` (each
    ``ray.train.report`` waits for a poll; Ray's 2 s default dominates short epochs), unless
    ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` is set in the environment. Raises TrainingFailedError."""
    key = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # read by Ray from the driver's env at fit time
    preset = key in os.environ
    if not preset:
        os.environ[key] = str(poll_interval_s)
    try:
        return trainer.fit()
    finally:
        if not preset:
            os.environ.pop(key, None)
