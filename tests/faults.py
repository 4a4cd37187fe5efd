"""Killing a real process of the test session's Ray mid-work, for the fault tests of each package
(``tests/{features,reward,align,serve}/test_*_faults.py``).

Processes are found in the GCS actor table of the Ray this process is connected to (``ray._private.state``: the
state API of ``ray.util.state`` needs the dashboard, which the test session does not start, and it refuses to
choose when another Ray runs on the machine), by class name and state ALIVE, so a process of another Ray instance
on the machine is never touched. ``kill`` sends SIGKILL, as a lost node or the OOM killer would, and waits until the
process is gone.
"""
from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")
U = TypeVar("U")


def wait_for(check: Callable[[], T], what: str, timeout_s: float = 120.0, every_s: float = 0.05) -> T:
    """``check()``'s first truthy value, polled every ``every_s``; fails naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def actors(class_part: str, state: str | None = "ALIVE") -> dict[str, dict]:
    """Actor id -> GCS record (``Pid``, ``State``, ``NumRestarts``, ...) of this Ray's actors whose class name
    contains ``class_part`` (``state``: only those in that state; None: any)."""
    from ray._private import state as gcs

    return {aid: a for aid, a in gcs.actors().items()
            if class_part in a["ActorClassName"] and (state is None or a["State"] == state)}


def alive_pids(class_part: str) -> dict[str, int]:
    """Actor id -> pid of this Ray's live actors of that class (ones started and given a process)."""
    return {aid: int(a["Pid"]) for aid, a in actors(class_part).items() if a["Pid"]}


def newest_alive_pid(class_part: str) -> tuple[str, int]:
    """(actor id, pid) of the live actor of that class started last: the work's own once it has shown progress
    (an actor of an earlier test that has not quite ended yet is older)."""
    live = [(a["StartTime"], aid, int(a["Pid"])) for aid, a in actors(class_part).items() if a["Pid"]]
    assert live, f"no live {class_part} actor"
    _, aid, pid = max(live)
    return aid, pid


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (reaped, or a zombie its raylet has not reaped yet)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill(pid: int, timeout_s: float = 30.0) -> None:
    """SIGKILL ``pid`` and wait until it has exited."""
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone(pid), f"pid {pid} to exit", timeout_s)


def during(work: Callable[[], T], fault: Callable[[], U]) -> tuple[T, U]:
    """(``work()``, ``fault()``): ``fault`` runs in a thread while ``work`` runs here; its error is raised after."""
    with ThreadPoolExecutor(1) as pool:
        injected = pool.submit(fault)
        return work(), injected.result()


def registered_epoch(run_dir: Path) -> int:
    """The epoch of the checkpoint Ray Train's controller registered last for the run in ``run_dir`` (0: none yet),
    the one a restarted worker group resumes from: the controller writes its snapshot, naming it, as it registers."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    try:
        snapshot = json.loads((Path(run_dir) / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).read_text())
    except (OSError, ValueError):  # not written yet, or being written
        return 0
    name = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name") or ""
    return int(name.split("_")[1]) if name.startswith("epoch_") else 0


def kill_train_worker_after(run_dir: Path, epoch: int) -> tuple[int, int, dict]:
    """Once epoch ``epoch``'s checkpoint of the run in ``run_dir`` is registered, SIGKILL the run's one Ray Train
    worker (in a later epoch by then). Returns its pid, the epoch of the checkpoint registered last when it had died
    and that checkpoint's ``state.json`` as it was then (a restarted group resumes from it)."""
    from sparserm.train_state import STATE_FILE

    wait_for(lambda: registered_epoch(run_dir) >= epoch, f"epoch {epoch}'s checkpoint in {run_dir}", 300)
    _, pid = newest_alive_pid("RayTrainWorker")
    kill(pid)
    last = registered_epoch(run_dir)
    return pid, last, json.loads((Path(run_dir) / f"epoch_{last:04d}" / STATE_FILE).read_text())
