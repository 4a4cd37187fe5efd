"""Experiment tracking (the ``tracking`` config section): each training stage's per-step and per-epoch metrics go
to TensorBoard event files in its run folder (on by default) and to MLflow (when ``tracking.mlflow_uri`` is set).

A stage builds a :func:`tracking_spec` (plain data, so a Ray Train worker gets it in its loop config) and the one
process that logs (rank 0 of a Ray Train loop) opens a :class:`Tracker` on it. The tracker's backends are the
entries of :data:`BACKENDS` that the config turns on (each says so in ``wanted``): their libraries are imported
when the tracker is made, and they open on the first ``log``, so a call that logs nothing (a finished run
resumed) leaves nothing behind. Steps are global (optimizer steps taken; the SAE's: sae-lens' own step count),
so a resumed run continues its curve: TensorBoard's reader drops an interrupted process's events from the new
process's first step on (tensorboardX ``purge_step``), and the MLflow run of the same folder (found again by its
``sparserm.run_key`` tag) takes no step below the end of what an earlier process logged to it. Only numbers are
logged (bools, None, strings and lists are left out); TensorBoard keeps them as float32.
"""
from __future__ import annotations

import importlib
import numbers
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["BACKENDS", "Tracker", "tracking_spec", "mlflow_store", "node_local_store_note"]

BACKENDS: dict[str, type] = {}  # name -> class: MODULES, wanted(config) -> bool, (spec, first_step), log, close
SQLITE = "sqlite:///"


def backend(name: str):
    """Registers a backend class under ``name`` (a new one needs no change anywhere else)."""
    def register(cls: type) -> type:
        BACKENDS[name] = cls
        return cls
    return register


def mlflow_store(uri: str) -> str:
    """``tracking.mlflow_uri`` as MLflow takes it, made absolute (a Ray worker's working folder is not the
    driver's): a plain folder is a local SQLite store ``<folder>/mlflow.db`` (MLflow 3 refuses its plain file
    store unless ``MLFLOW_ALLOW_FILE_STORE`` is set); other URIs (``http(s)://``, ``sqlite:///``) as given."""
    if "://" not in uri:
        return SQLITE + str(Path(uri).expanduser().resolve() / "mlflow.db")
    if uri.startswith(SQLITE) and not uri.startswith(SQLITE + "/"):
        return SQLITE + str(Path(uri[len(SQLITE):]).resolve())
    return uri


def node_local_store_note(uri: str) -> str | None:
    """The warning for a local MLflow store (``uri`` as :func:`mlflow_store` gives it) on a Ray cluster of more
    than one node, else None: each run's metrics land on the disk of the node whose rank 0 logged them, where
    the driver and the other nodes may not see them."""
    if not uri.startswith(SQLITE):
        return None
    import ray

    alive = [n for n in ray.nodes() if n["Alive"]] if ray.is_initialized() else []
    if len(alive) < 2:
        return None
    return (f"tracking.mlflow_uri is a local store ({uri[len(SQLITE):]}) on a cluster of {len(alive)} nodes: this "
            f"run's MLflow metrics go to the disk of node {ray.get_runtime_context().get_node_id()[:12]}, which the "
            "driver and the other nodes see only if that folder is on a disk they all share; give "
            "tracking.mlflow_uri an MLflow server (http://host:5000) instead")


def tracking_spec(tracking, log_dir: str | Path, stage: str, params: Mapping[str, Any] | None = None) -> dict | None:
    """What a process needs to open a :class:`Tracker` on ``tracking`` (a ``TrackingConfig``; None: tracking off):
    the backends' settings, the absolute event folder ``log_dir``, the stage's name and the params an MLflow run
    records (e.g. the run's fingerprint)."""
    from sparserm.storage import place_of

    if tracking is None:
        return None
    uri = tracking.mlflow_uri
    return {"config": {"tensorboard": tracking.tensorboard, "mlflow_uri": uri and mlflow_store(uri),
                       "mlflow_experiment": tracking.mlflow_experiment},
            "dir": str(Path(log_dir).resolve()), "stage": stage, "params": {"stage": stage, **(params or {})},
            "upload": place_of(Path(log_dir))}  # inside a storage URI's mirror: event files go there from any node


def _number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


class Tracker:
    """Logs numbers at global steps to every backend ``spec`` turns on; without a spec, or on a rank other than 0,
    it logs nothing. A context manager (or call :meth:`close`); every ``log`` reaches the disk or server at once."""

    def __init__(self, spec: dict | None, rank: int = 0):
        self.spec = spec if rank == 0 else None
        self.backends: list | None = None  # opened by the first log that has something to log
        for cls in self._wanted():  # imported now: a worker's memory baseline taken after this holds them
            for module in cls.MODULES:
                importlib.import_module(module)

    def _wanted(self) -> list[type]:
        return [] if self.spec is None else [cls for cls in BACKENDS.values() if cls.wanted(self.spec["config"])]

    @property
    def active(self) -> bool:
        """Whether anything logged goes anywhere (a caller may skip building metrics otherwise)."""
        return bool(self._wanted())

    def log(self, metrics: Mapping[str, Any], step: int, prefix: str = "") -> None:
        """``metrics``' numbers at ``step``, each named ``prefix + key``."""
        self.log_points([(step, {prefix + k: v for k, v in metrics.items()})])

    def log_epoch(self, row: Mapping[str, Any], steps: Mapping[str, list], first_step: int) -> None:
        """One epoch: step ``i`` of ``steps`` (a list of values per key, all of the epoch's step count) at global
        step ``first_step + i`` as ``step/<key>``, then the numbers of ``row`` as ``epoch/<key>`` at its last step."""
        n = len(next(iter(steps.values())))
        points = [(first_step + i, {f"step/{k}": v[i] for k, v in steps.items()}) for i in range(n)]
        self.log_points(points + [(first_step + n - 1, {f"epoch/{k}": v for k, v in row.items()})])

    def log_points(self, points: Iterable[tuple[int, Mapping[str, Any]]]) -> None:
        """``(step, metrics)`` pairs, in step order."""
        points = [(int(s), {k: float(v) for k, v in m.items() if _number(v)}) for s, m in points]
        points = [(s, m) for s, m in points if m]
        if self.spec is None or not points:
            return
        if self.backends is None:
            self.backends = [cls(self.spec, points[0][0]) for cls in self._wanted()]
        for b in self.backends:
            b.log(points)

    def close(self) -> None:
        for b in self.backends or ():
            b.close()
        self.backends = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@backend("tensorboard")
class TensorBoard:
    """tensorboardX event files in the spec's folder; the first step logged purges (for TensorBoard's readers)
    what an earlier, interrupted process logged there from that step on."""

    MODULES = ("tensorboardX",)

    @staticmethod
    def wanted(config: dict) -> bool:
        return bool(config["tensorboard"])

    def __init__(self, spec: dict, first_step: int):
        from tensorboardX import SummaryWriter

        # tensorboardX names a file by the second and the host only: a second writer in the same second (a resumed
        # process, another worker) would open the same file and wipe the first's events. The nanosecond clock and
        # the pid keep every writer's file its own, and in the order they were opened: TensorBoard reads a folder's
        # files in name order, and a step going back (the earlier file read last) would purge the later one's
        suffix = f".{time.time_ns():020d}.{os.getpid()}"
        self.writer = SummaryWriter(logdir=spec["dir"], purge_step=first_step, filename_suffix=suffix)
        self.dir, self.place = Path(spec["dir"]), spec.get("upload")

    def log(self, points: list[tuple[int, dict]]) -> None:
        for step, metrics in points:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        """Closes the event file; a run on a storage URI gets this folder's event files uploaded there (the node
        that logged may not be the driver's, whose push of the output folder would miss them)."""
        self.writer.close()
        if self.place is not None:
            from sparserm.storage import upload

            for path in sorted(self.dir.glob("events.out.tfevents.*")):
                upload(self.place, path)


@backend("mlflow")
class MLflow:
    """One MLflow run per run folder in the experiment ``tracking.mlflow_experiment``, reopened by a later process
    of the same folder (tag ``sparserm.run_key``); params: the stage and the spec's params, recorded once. A step
    below ``sparserm.next_step`` (what earlier processes logged) is not logged again."""

    KEY, NEXT = "sparserm.run_key", "sparserm.next_step"
    MODULES = ("mlflow",)

    @staticmethod
    def wanted(config: dict) -> bool:
        return config["mlflow_uri"] is not None

    def __init__(self, spec: dict, first_step: int):
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        from sparserm.manifest import stable_hash

        uri, name = spec["config"]["mlflow_uri"], spec["config"]["mlflow_experiment"]
        if uri.startswith(SQLITE):  # SQLite makes the file, not its folder
            Path(uri[len(SQLITE):]).parent.mkdir(parents=True, exist_ok=True)
            note = node_local_store_note(uri)
            if note:
                print(f"[tracking] warning: {note}", flush=True)
        self.client = c = MlflowClient(tracking_uri=uri)
        exp = c.get_experiment_by_name(name)
        if exp is None:
            try:
                c.create_experiment(name)
            except MlflowException:  # another run (a concurrent job) created it since: that one is ours too
                if c.get_experiment_by_name(name) is None:
                    raise
            exp = c.get_experiment_by_name(name)
        exp_id = exp.experiment_id
        key = stable_hash(spec["dir"])
        found = c.search_runs([exp_id], f"tags.`{self.KEY}` = '{key}'", max_results=1)
        if found:
            run = found[0]
            c.update_run(run.info.run_id, status="RUNNING")
        else:
            run = c.create_run(exp_id, run_name=f"{spec['stage']} {'/'.join(Path(spec['dir']).parts[-4:-1])}",
                               tags={self.KEY: key, "sparserm.log_dir": spec["dir"], "sparserm.stage": spec["stage"]})
            c.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in spec["params"].items()])
        self.run_id, self.floor = run.info.run_id, int(run.data.tags.get(self.NEXT, 0))

    def log(self, points: list[tuple[int, dict]]) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, s) for s, m in points if s >= self.floor for k, v in m.items()]
        if not metrics:
            return
        tag = RunTag(self.NEXT, str(max(m.step for m in metrics) + 1))
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch; the last batch moves the tag
            last = i + 1000 >= len(metrics)
            self.client.log_batch(self.run_id, metrics=metrics[i: i + 1000], tags=[tag] if last else [])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
