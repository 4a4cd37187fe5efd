"""Stages submitted as Ray jobs: every ``jobs/<stage>.py`` is the CLI's own command, and a features job submitted
through the Job Submission API to a cluster started with ``ray start --head`` succeeds and writes its run folder.

The cluster is this module's own (``local_cluster``, tests/cluster/conftest.py: ``cluster/local_multinode.py``
starts it with its own temp dir, free ports on 127.0.0.1 and token, and ends only its processes).
"""
from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]

# jobs/<module>.py -> the sparserm CLI words it puts before its own arguments, and arguments that make a full command
JOBS = {
    "features": (["features"], ["c.yaml"]),
    "sae_train": (["sae", "train"], ["c.yaml"]),
    "rm_train": (["rm", "train"], ["c.yaml"]),
    "rm_ablate": (["rm", "ablate"], ["c.yaml"]),
    "rm_sweep": (["rm", "sweep"], ["c.yaml"]),
    "align": (["align"], ["c.yaml"]),
    "fpo": (["fpo"], ["c.yaml"]),
    "steer": (["steer"], ["build", "c.yaml"]),
    "evaluate": (["rm", "evaluate"], ["rm", "RM_DIR", "data.jsonl"]),
    "serve_rm": (["serve", "rm"], ["RM_DIR"]),
    "serve_steer": (["serve", "steer"], ["MAP_DIR"]),
}


@pytest.mark.parametrize("module", sorted(JOBS))
def test_each_job_entry_point_runs_the_cli_command(module, monkeypatch):
    """Run as ``python -m jobs.<module> ARGS`` would, the module calls ``sparserm.cli.main`` with the CLI's words
    for its stage in front of ARGS, and the CLI's parser takes them as one of its commands."""
    import sparserm.cli
    from sparserm.cli import build_parser

    words, args = JOBS[module]
    seen = []
    monkeypatch.setattr(sparserm.cli, "main", lambda argv: seen.append(argv) or 0)
    monkeypatch.setattr(sys, "argv", [f"jobs/{module}.py", *args])
    with pytest.raises(SystemExit) as done:
        runpy.run_module(f"jobs.{module}", run_name="__main__")
    assert done.value.code == 0
    tail = args[1:] if module == "evaluate" else args  # `jobs.evaluate rm ...` is `sparserm rm evaluate ...`
    assert seen == [[*words, *tail]]
    parsed = build_parser().parse_args(seen[0])
    assert callable(parsed.func) and parsed.command == words[0]


def test_every_stage_has_a_job_and_every_job_is_checked():
    modules = {p.stem for p in (ROOT / "jobs").glob("*.py")} - {"__init__"}
    assert modules == set(JOBS)
    stages = {tuple(w) for w, _ in JOBS.values()}
    for stage in [("features",), ("sae", "train"), ("rm", "train"), ("rm", "ablate"), ("rm", "sweep"), ("align",),
                  ("fpo",), ("steer",), ("serve", "rm"), ("serve", "steer")]:
        assert stage in stages


def test_evaluate_job_refuses_an_unknown_kind(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["jobs/evaluate.py", "features", "x"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("jobs.evaluate", run_name="__main__")
    assert "usage" in str(done.value.code)


# ------------------------------------------------------------------ a real job on a real cluster

JOB_TIMEOUT_S = 300


def runtime_env(cache: Path) -> dict:
    """cluster/runtime_env.yaml as a job here gets it, ``pip:`` included: Ray clones the virtualenv the cluster
    runs from and pip-installs the uploaded working dir into it (once per cluster and pip list, ~25 s here: the
    dependencies are in the clone already, the build backend comes from the package index). ``working_dir: .``
    is the repository root, as ``ray job submit`` from the root reads it; the cache variable points at this
    test's folder instead of /mnt/shared."""
    env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    env["working_dir"] = str((ROOT / env["working_dir"]).resolve())
    env["env_vars"] = {**env["env_vars"], "SPARSERM_CACHE": str(cache)}
    return env


def _write_pairs(path: Path, n: int) -> Path:
    rows = [{"prompt": f"Question {i}: how do I bake bread?", "chosen": f"Mix flour and water {i}.",
             "rejected": "I won't help with that." + " no" * (i % 3)} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    return path


def wait_for(client, job_id: str, timeout: float = JOB_TIMEOUT_S):
    """The job's final status (or its status when ``timeout`` ran out, after stopping it) and its logs."""
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                             JobStatus.STOPPED}:
        if time.time() > deadline:
            client.stop_job(job_id)
            break
        time.sleep(1)
    return status, client.get_job_logs(job_id)


def test_features_job_submitted_to_a_ray_start_cluster_writes_its_run_folder(local_cluster, tiny_model_dir,
                                                                              tmp_path):
    from ray.job_submission import JobStatus

    from sparserm.config import Config, build
    from sparserm.features.cache import ActivationCache
    from sparserm.features.stage import prepare_data
    from sparserm.model.backbone import load_backbone
    from sparserm.model.forward import group_states
    from sparserm.model.text import encode_group

    pairs, cache, out = _write_pairs(tmp_path / "pairs.jsonl", 12), tmp_path / "cache", tmp_path / "run"
    config = tmp_path / "features.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"seed": 3}, "data": {"sources": [{"path": str(pairs)}], "eval_fraction": 0.25},
        "model": {"name": str(tiny_model_dir), "layer": 2, "max_tokens": 32},
        "features": {"num_actors": 1, "num_cpus": 1, "batch_size": 4, "token_sample_rate": 0.5}}))
    client = local_cluster.client()
    t0 = time.time()
    job_id = client.submit_job(entrypoint=f"python -m jobs.features {config} 'model.extra_layers=[1]' "
                                          f"--output-dir {out}",
                               runtime_env=runtime_env(cache))
    status, logs = wait_for(client, job_id)
    print(f"features job {job_id}: {status} in {time.time() - t0:.1f} s")
    assert status == JobStatus.SUCCEEDED, f"job {job_id} ended {status}; its logs:\n{logs}"
    assert "[features] 24 texts" in logs  # the model pass ran in the job (12 pairs, both sides), not a reused cache

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "features"
    # the driver ran the uploaded working_dir's copy of jobs/features.py, inside this cluster's session
    assert Path(manifest["argv"][0]).name == "features.py"
    assert Path(manifest["argv"][0]).is_relative_to(local_cluster.temp_dir)
    cfg = build(Config, manifest["config"])
    assert cfg.run.cache_dir == str(cache)  # the runtime env's SPARSERM_CACHE reached the job
    assert cfg.model.layers == (1, 2)  # the override on the entrypoint was applied
    assert manifest["cache"]["n_pairs"] == 12 and manifest["cache"]["d_model"] == 64
    assert manifest["cache"]["layers"] == [1, 2] and manifest["cache"]["n_texts"] == 24
    assert sum(1 for _ in open(out / "rejects.jsonl")) == 1  # the invalid line, recorded
    assert json.loads((out / "data_summary.json").read_text())

    activations = ActivationCache(manifest["activation_cache"])
    assert activations.root.is_relative_to(cache) and activations.is_complete
    for layer in (1, 2):
        assert activations.read_pooled(layer).states.shape == (24, 64)
    # what the job stored is the model's own residual stream: equal to a direct forward here, in this process
    table = activations.read_pooled(2)
    ids, hw, hl = table.pairs()
    rows = {r["row_id"]: r for r in prepare_data(cfg).rows}
    assert set(ids) == set(rows)
    backbone = load_backbone(cfg.model, cfg.run.cache_dir)
    for k in (0, 7, 11):
        r = rows[ids[k]]
        ref = group_states(backbone, encode_group(backbone.tokenizer, r["prompt"], [r["chosen"], r["rejected"]], 32),
                           share_prefix=False)
        assert torch.allclose(hw[k], ref[0].pooled(2, cfg.model.pooling), atol=1e-4)
        assert torch.allclose(hl[k], ref[1].pooled(2, cfg.model.pooling), atol=1e-4)
    x, _ = activations.read_tokens(2, 64, split=None)
    computed = manifest["cache"]["n_computed"]
    assert 0.3 * computed < len(x) < 0.7 * computed  # token_sample_rate 0.5 of the computed tokens


PROBE = """
import json, shutil, sys, sysconfig
from importlib import metadata
site = sysconfig.get_paths()["purelib"]
[dist] = [d for d in metadata.distributions(path=[site]) if d.metadata["Name"] == "sparserm"]
print("PROBE " + json.dumps({"prefix": sys.prefix, "site": site,
                             "direct_url": json.loads(dist.read_text("direct_url.json")),
                             "files": [str(f) for f in dist.files if str(f).startswith("sparserm/")],
                             "console_script": shutil.which("sparserm")}))
"""


def readme_submit() -> str:
    """The README's ``submit`` shell function (both of its cluster blocks define the same one)."""
    found = {line.split("   #")[0].strip() for line in (ROOT / "README.md").read_text().splitlines()
             if line.startswith("submit() {")}
    assert len(found) == 1, found
    return found.pop()


def test_the_runtime_env_installs_the_uploaded_project_into_the_jobs_own_virtualenv(local_cluster, tmp_path):
    """Submitted as the README says (its ``submit`` function, ``--no-wait``, from the repository root): the job's
    Python is a virtualenv Ray made for this runtime env (not the cluster's own, where sparserm is an editable
    install of this checkout); in its site-packages sparserm is a regular install (not editable) of the
    uploaded working dir, holding this checkout's modules byte for byte, and its ``sparserm`` command is the
    one on the job's PATH and runs."""
    from ray.job_submission import JobStatus

    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    pairs = _write_pairs(tmp_path / "pairs.jsonl", 4)
    env = {**local_cluster.env(), "RAY_ADDRESS": local_cluster.dashboard_url,
           "RUNTIME_ENV": "cluster/runtime_env.local.yaml",  # as the README's one-machine block exports it
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    script = f"{readme_submit()}\nsubmit --no-wait -- sh -c 'python {probe} && sparserm data check {pairs}'"
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = re.search(r"Job '(\S+)' submitted successfully", out.stdout + out.stderr).group(1)
    client = local_cluster.client()
    status, logs = wait_for(client, job_id)
    assert status == JobStatus.SUCCEEDED, f"job {job_id} ended {status}; its logs:\n{logs}"
    [line] = [x for x in logs.splitlines() if x.startswith("PROBE ")]
    got = json.loads(line[len("PROBE "):])
    env_root = Path(got["prefix"])
    assert env_root.is_relative_to(local_cluster.temp_dir) and "runtime_resources/pip" in str(env_root)
    assert Path(got["site"]).is_relative_to(env_root) and env_root != Path(sys.prefix)
    assert "editable" not in got["direct_url"].get("dir_info", {})  # installed, not linked to a checkout
    assert "runtime_resources/working_dir_files" in got["direct_url"]["url"]  # from the uploaded copy
    installed = {f for f in got["files"] if f.endswith(".py")}
    assert installed == {str(p.relative_to(ROOT)) for p in (ROOT / "sparserm").rglob("*.py")}
    for rel in ("sparserm/cli.py", "sparserm/ray_train.py"):
        assert (Path(got["site"]) / rel).read_bytes() == (ROOT / rel).read_bytes()
    assert Path(got["console_script"]).is_relative_to(env_root)
    summary, _ = json.JSONDecoder().raw_decode(logs, logs.index("\n{", logs.index(line)) + 1)
    assert summary["n_pairs"] == 4 and summary["n_rejected"] == 1  # `data check` ran: 4 pairs, the bad line
