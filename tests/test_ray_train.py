"""``ensure_ray``: a local instance's own processes find their cluster while another Ray instance runs on the
machine (Ray Train's placement-group cleaner asks the State API with no address; before, with a second instance
it raised "Found multiple active Ray instances" in every run, and the cleaner's thread died)."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

DRIVER = """
import json, os, ray
from sparserm.ray_train import ensure_ray

ensure_ray(log_to_driver=False)

@ray.remote
def ask():
    from ray.util.state import list_nodes  # no address, as the cleaner asks
    return [n.node_id for n in list_nodes()], os.environ.get("RAY_ADDRESS")

nodes, seen = ray.get(ask.remote())
ctx = ray.get_runtime_context()
print(json.dumps({"nodes": nodes, "own": ctx.get_node_id(), "gcs": ctx.gcs_address, "seen": seen,
                  "driver_env": [os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")]}))
"""


def test_a_local_instances_workers_find_their_own_cluster_beside_another_instance(ray_session):
    # the second instance: this test process's own (ray_session); a temp dir of its own keeps the driver from
    # joining a `ray start` cluster some other process left on this machine
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    try:
        out = subprocess.run([sys.executable, "-c", DRIVER], capture_output=True, text=True, timeout=180,
                             env={**env, "RAY_TMPDIR": tmp})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["nodes"] == [got["own"]] != [ray_session.get_runtime_context().get_node_id()]
    assert got["seen"] == "127.0.0.1:" + got["gcs"].rsplit(":", 1)[1]  # the worker's RAY_ADDRESS: its own GCS
    assert got["driver_env"] == [None, None]  # the driver's environment is as it was


def test_a_quieted_worker_loads_models_and_deepspeed_without_console_noise():
    # a fresh process, as a Ray worker is: transformers' weight-loading bars and DeepSpeed's "no accelerator"
    # warning were an empty line and a warning per worker in the driver's console
    code = """
from sparserm.ray_train import quiet_worker_logs
quiet_worker_logs()
import deepspeed
from deepspeed.accelerator import get_accelerator
from transformers.utils import logging
print(logging.is_progress_bar_enabled(), get_accelerator().device_name())
"""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    import torch

    assert out.stdout.split() == ["False", "cuda" if torch.cuda.is_available() else "cpu"]
    assert "Setting accelerator" not in out.stdout + out.stderr
