"""Multi-node on one machine: a head with one CPU and a second node with one CPU and a custom resource
(``cluster/local_multinode.py``, as README says to start them) run the work of ``multinode_work.py`` (a driver
of its own joined to them): the features pass with two actors, the reward head with two Ray Train workers, one
DPO epoch with two workers, a CPU each. Meanwhile the same work runs here, on the test session's one-node Ray of
two CPUs (``ray_session``). One CPU a node places one actor or worker on each: the work's own records say so (the
features' receipts, the head's and DPO's per-rank placements), and what it wrote equals the one-node run's: the
activation cache exactly, the trained weights within ``ATOL``/``RTOL`` (the same two-rank sums on either; gloo
carries them between nodes or within one). Both log the DPO epoch to one MLflow server, as a cluster's nodes
would (a folder store is on one node's disk): each run's logged steps and row are its own."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from sparserm.testing import mlflow_metrics

WORK = Path(__file__).with_name("multinode_work.py")
ROOT = Path(__file__).resolve().parents[2]
SECOND_NODE = "node2"  # the second node's custom resource: it names that node in ray.nodes()
ATOL, RTOL = 1e-6, 1e-5  # trained weights, two nodes against one


def _write_pairs(path: Path, n: int) -> Path:
    rows = [{"prompt": f"Question {i}: how do I bake bread?", "chosen": f"Mix flour and water {i}, then bake.",
             "rejected": "I won't help with that." + " no" * (i % 3)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _start_driver(cluster, model_dir: Path, pairs: Path, out: Path, mlflow_uri: str) -> subprocess.Popen:
    """``multinode_work.py`` as a driver joined to ``cluster``, started (its output in ``<out>.log``). The actor
    pool starts whole before Ray Data hands out blocks (``RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S``), so neither
    actor takes every block while the other is still loading the model."""
    env = {**cluster.env(), "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300"}
    with open(out.with_suffix(".log"), "w") as log:
        return subprocess.Popen([sys.executable, str(WORK), cluster.gcs_address, str(model_dir), str(pairs),
                                 str(out), mlflow_uri], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def _driver_work(driver: subprocess.Popen, out: Path) -> dict:
    """The driver's ``work.json``, once it has ended (within 10 minutes) and succeeded."""
    try:
        rc = driver.wait(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert rc == 0, f"the driver failed:\n{out.with_suffix('.log').read_text()[-8000:]}"
    return json.loads((out / "work.json").read_text())


def _cache_table(root: str) -> pa.Table:
    """Every shard of an activation cache, rows in (row id, side) order: what the pass computed, whichever actor
    wrote which shard."""
    files = sorted(Path(root, "shards").glob("*.parquet"))
    assert files, f"no shards in {root}"
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by([("row_id", "ascending"),
                                                                       ("side", "ascending")])


def _assert_weights_close(a: Path, b: Path, name: str) -> None:
    wa, wb = load_file(str(a / name)), load_file(str(b / name))
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"{name} {k}: {m}")


def test_work_runs_on_both_nodes_and_matches_one_node(ray_cluster, ray_session, nothing_left_holding_cpus,
                                                       tiny_model_dir, tmp_path, mlflow_server):
    from multinode_work import run_work

    pairs, out = _write_pairs(tmp_path / "pairs.jsonl", 12), tmp_path / "two_nodes"
    with ray_cluster(head_cpus=1, node_cpus=1, node_resources={SECOND_NODE: 1}) as cluster:
        t0 = time.time()
        driver = _start_driver(cluster, tiny_model_dir, pairs, out, mlflow_server)
        try:  # the one-node run meanwhile, here: the two overlap their waits for processes to start
            single = run_work(None, str(tiny_model_dir), str(pairs), str(tmp_path / "one_node"), mlflow_server)
        finally:
            multi = _driver_work(driver, out)
    print(f"two nodes {multi['seconds']}, one node {single['seconds']}: {time.time() - t0:.1f} s together")

    # the two nodes: the head, and the one holding the custom resource
    assert len(multi["nodes"]) == 2
    (second,) = [n for n, res in multi["nodes"].items() if res.get(SECOND_NODE) == 1]
    (head,) = set(multi["nodes"]) - {second}
    assert multi["nodes"][head]["CPU"] == 1 and multi["nodes"][second]["CPU"] == 1
    # both computed features (the receipts' node ids), and each held one rank of the head and of DPO
    assert multi["features_nodes"] == sorted([head, second])
    assert sorted(multi["head_nodes"]) == sorted([head, second])
    assert sorted(multi["dpo_nodes"]) == sorted([head, second])
    (only,) = single["nodes"]
    assert single["features_nodes"] == [only] and single["head_nodes"] == single["dpo_nodes"] == [only, only]

    # the activation cache: every column of every text (pooled residuals of each layer, token sample, metadata)
    two, one = _cache_table(multi["cache"]), _cache_table(single["cache"])
    assert two.num_rows == 24 and two.schema == one.schema
    assert two.equals(one)
    # the trained weights: the reward head's best epoch, the DPO epoch's LoRA adapter
    _assert_weights_close(Path(multi["head"]), Path(single["head"]), "head.safetensors")
    _assert_weights_close(Path(multi["dpo_adapter"]), Path(single["dpo_adapter"]), "adapter_model.safetensors")
    adapter = load_file(str(Path(multi["dpo_adapter"]) / "adapter_model.safetensors"))
    assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 0  # it trained (B starts at 0)
    assert abs(multi["dpo_row"]["loss"] - single["dpo_row"]["loss"]) < 1e-5

    # the DPO epoch's tracking, on the MLflow server both runs shared (whichever node held rank 0, which logs):
    # each run's own MLflow run holds its own steps and epoch row, at global steps
    for run in (multi, single):
        ml, row = mlflow_metrics(mlflow_server, run["dpo_log_dir"]), run["dpo_row"]
        assert ml["step/loss"] == [(k + 1, v) for k, v in enumerate(row["step_loss"])] and row["step_loss"]
        assert ml["epoch/loss"] == [(row["global_step"], row["loss"])]
        assert ml["epoch/reward_accuracy"] == [(row["global_step"], row["reward_accuracy"])]
    # a local (SQLite) MLflow store would have been warned about on two nodes only
    assert single["local_store_note"] is None
    assert "on a cluster of 2 nodes" in multi["local_store_note"] and "mlruns/mlflow.db" in multi["local_store_note"]
