"""A Ray cluster of one or two nodes on this machine: multi-node work tried without a second machine.

``ray start --head`` and, with ``--node-cpus``, a second node joining it (``ray start --address``) with its own
CPUs and custom resources. Each node has its own ``--temp-dir`` (a short folder under /tmp: Ray's socket paths
must stay under 107 characters), every port is chosen free and bound to 127.0.0.1 (workers: ports the OS
picks), authentication is a fresh token (``RAY_AUTH_MODE=token``), and no ``RAY_ADDRESS`` is inherited: no other
Ray on this machine is joined or touched. ``stop`` ends only the processes whose command lines name these
temp dirs (``ray stop`` would end every Ray on the machine).

    python cluster/local_multinode.py start [--head-cpus 1] [--node-cpus 1] [--node-resources '{"node2": 1}']
                                            [--dashboard]
        prints one JSON line: gcs_address (for ray.init / run.ray_address), dashboard_url, temp_dirs, token
    python cluster/local_multinode.py stop TEMP_DIR [TEMP_DIR ...]

A driver joins with ``RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<token>`` in its environment (``LocalCluster.env``)
and ``ray.init(address=<gcs_address>)`` (``run.ray_address=<gcs_address>`` for a sparserm stage).
tests/cluster/conftest.py starts and stops its clusters with these functions.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port")
NODE_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
              "metrics-export-port", "node-manager-port", "object-manager-port")  # every node's own
RAY = str(Path(sys.executable).parent / "ray")


@dataclass(frozen=True)
class LocalCluster:
    """A running cluster: its GCS address, dashboard (Job Submission API) URL, temp dirs (head first) and the
    authentication token."""

    gcs_address: str
    dashboard_url: str | None  # None: started without the dashboard
    temp_dirs: tuple[Path, ...]
    token: str

    @property
    def temp_dir(self) -> Path:
        return self.temp_dirs[0]

    def env(self) -> dict:
        """The environment of a process that joins this cluster (``ray.init(address=self.gcs_address)``)."""
        return cluster_env(self.token)

    def client(self):
        """A ``JobSubmissionClient`` of this cluster, sending its token."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers={"Authorization": f"Bearer {self.token}"})

    def to_json(self) -> str:
        return json.dumps({"gcs_address": self.gcs_address, "dashboard_url": self.dashboard_url,
                           "temp_dirs": [str(d) for d in self.temp_dirs], "token": self.token})


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now (held open together, so no two are the same)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cluster_env(token: str) -> dict:
    """What ``ray start`` (and so every driver, job and worker) runs with: no RAY_ADDRESS; token authentication on
    with this cluster's own token (Ray 2.60's ``ray start`` turns it on by itself when ~/.ray/auth_token exists and
    leaves it off otherwise; pinned here, nothing depends on that file); and this Python's bin folder first on
    PATH, so a job's ``python -m jobs.<stage>`` is the interpreter that has sparserm."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return env


def _ray_start(args: list[str], temp_dir: Path, ports: tuple[str, ...], cpus: float, env: dict,
               object_store_mb: int) -> None:
    port_args = [a for name, port in zip(ports, free_ports(len(ports))) for a in (f"--{name}", str(port))]
    cmd = [RAY, "start", *args, "--node-ip-address", "127.0.0.1", "--num-cpus", f"{cpus:g}", "--num-gpus", "0",
           "--temp-dir", str(temp_dir), "--object-store-memory", str(object_store_mb * 2**20),
           "--min-worker-port", "0", "--max-worker-port", "0", "--disable-usage-stats", *port_args]
    started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{started.stdout}\n{started.stderr}")


def start_cluster(head_cpus: float = 1, node_cpus: float | None = None, node_resources: dict | None = None,
                  dashboard: bool = False, object_store_mb: int = 200) -> LocalCluster:
    """The head (``head_cpus``; the dashboard and Job Submission API with ``dashboard``, answering before this
    returns) and, unless ``node_cpus`` is None, a second node with ``node_cpus`` and ``node_resources``. A
    start that fails stops what it started and raises RuntimeError."""
    token = uuid.uuid4().hex
    env = cluster_env(token)
    temp_dirs: list[Path] = []
    try:
        temp_dirs.append(Path(tempfile.mkdtemp(prefix="srm-ray-", dir="/tmp")))
        gcs_port, dashboard_port, client_port = free_ports(len(HEAD_PORTS))
        _ray_start(["--head", "--port", str(gcs_port), "--ray-client-server-port", str(client_port),
                    "--include-dashboard", str(dashboard).lower(), "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(dashboard_port)], temp_dirs[0], NODE_PORTS, head_cpus, env,
                   object_store_mb)
        cluster = LocalCluster(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}" if dashboard else None,
                               tuple(temp_dirs), token)
        if node_cpus is not None:
            temp_dirs.append(Path(tempfile.mkdtemp(prefix="srm-ray-", dir="/tmp")))
            _ray_start(["--address", cluster.gcs_address, "--resources", json.dumps(node_resources or {})],
                       temp_dirs[1], NODE_PORTS, node_cpus, env, object_store_mb)
            cluster = LocalCluster(cluster.gcs_address, cluster.dashboard_url, tuple(temp_dirs), token)
        if dashboard:
            _wait_for_job_api(cluster)
        return cluster
    except BaseException:
        stop_cluster(temp_dirs)
        raise


def _wait_for_job_api(cluster: LocalCluster, timeout: float = 90) -> None:
    """The dashboard's HTTP server comes up shortly after ``ray start`` returns: until it answers (refused until
    it listens), or RuntimeError after ``timeout`` seconds."""
    import requests

    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        try:
            cluster.client().list_jobs()
            return
        except (ConnectionError, requests.exceptions.ConnectionError) as exc:
            last = exc
            time.sleep(1)
    raise RuntimeError(f"the Job Submission API at {cluster.dashboard_url} did not answer within {timeout} s: {last}")


def stop_cluster(temp_dirs, timeout: float = 2.0) -> None:
    """SIGTERM, then SIGKILL, this cluster's processes and no other: those whose command line names one of
    ``temp_dirs`` or that hold a file open under one (the agents and Ray workers retitle themselves, the client
    server names only the GCS address; all log there), and their children; never this process or the ones that
    started it (e.g. the shell running ``stop DIR``). Then the folders are removed. The GCS, the raylets and the
    runtime-env agent outlast a SIGTERM by seconds (``ray stop`` waits 16 s, then kills): ``timeout`` is short,
    nothing of a throwaway cluster is worth keeping."""
    import psutil

    names = [str(d) for d in temp_dirs]
    spare = {os.getpid(), *(p.pid for p in psutil.Process().parents())}

    def names_ours(p) -> bool:
        if any(n in a for a in (p.info["cmdline"] or ()) for n in names):
            return True
        return any(f.path.startswith(n + os.sep) for f in p.open_files() for n in names)

    def ours() -> list:
        found = {}
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.pid not in spare and names_ours(p):
                    found.update({q.pid: q for q in (p, *p.children(recursive=True)) if q.pid not in spare})
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return list(found.values())

    procs = ours()
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive + ours():  # ours() again: a worker started while the others went down
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    for d in names:
        shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start the head and (--node-cpus) a second node; print them as JSON")
    start.add_argument("--head-cpus", type=float, default=1)
    start.add_argument("--node-cpus", type=float, default=1, help="the second node's CPUs; 0: no second node")
    start.add_argument("--node-resources", type=json.loads, default={"node2": 1}, help="JSON, the second node's")
    start.add_argument("--dashboard", action="store_true", help="the dashboard and Job Submission API on the head")
    stop = sub.add_parser("stop", help="end the processes of these temp dirs (what `start` printed) and remove them")
    stop.add_argument("temp_dirs", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "stop":
        stop_cluster(args.temp_dirs)
        return 0
    cluster = start_cluster(args.head_cpus, args.node_cpus or None, args.node_resources, args.dashboard)
    print(cluster.to_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
