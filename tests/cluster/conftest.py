"""Real Ray clusters on this machine for the cluster tests, started and stopped by ``cluster/local_multinode.py``
(the script README documents: one implementation for both). Each has its own temp dirs, free ports on 127.0.0.1
and token, and no ``RAY_ADDRESS`` inherited, so neither the test session's ``ray.init()`` instance
(``ray_session``) nor another cluster on this machine is touched; teardown ends only its own processes."""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_script():
    spec = importlib.util.spec_from_file_location("local_multinode", ROOT / "cluster" / "local_multinode.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves its annotations through sys.modules
    spec.loader.exec_module(module)
    return module


local_multinode = _load_script()


@contextmanager
def running_cluster(**kwargs):
    """``local_multinode.start_cluster(**kwargs)``, stopped (only its processes) when the block ends."""
    try:
        cluster = local_multinode.start_cluster(**kwargs)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield cluster
    finally:
        local_multinode.stop_cluster(cluster.temp_dirs)


@pytest.fixture(scope="module")
def local_cluster():
    """``ray start --head --num-cpus 2`` with the dashboard (the Job Submission API is the dashboard head's; it hands
    each job to the dashboard agent of the head node), answering before the test runs; stopped after the module."""
    with running_cluster(head_cpus=2, dashboard=True) as cluster:
        yield cluster


@pytest.fixture
def ray_cluster():
    """``running_cluster``, for a test that keeps a cluster up only for part of its work (its idle processes not
    competing with the rest): ``with ray_cluster(head_cpus=1, node_cpus=1, ...) as cluster``."""
    return running_cluster


@pytest.fixture
def mlflow_server(tmp_path_factory):
    """An MLflow tracking server (``mlflow server``, one worker, a SQLite store in a temp folder) on a free port of
    127.0.0.1, as a cluster's nodes share one: its URI, once ``/health`` answers; stopped after the test."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    (port,) = local_multinode.free_ports(1)
    mlflow = Path(sys.executable).with_name("mlflow")
    with open(folder / "server.log", "w") as log:
        server = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                                   "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                                   "--default-artifact-root", str(folder / "artifacts")],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not answer:\n{(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
