"""Outputs and caches on a storage URI (sparserm.storage), against a real S3-compatible server: moto's server mode,
started here on 127.0.0.1, reached by pyarrow's S3 filesystem as a cluster's nodes reach S3."""
import json
import os

import pytest
import torch

from sparserm import storage
from sparserm.cli import main
from sparserm.reward.model import SparseRM
from sparserm.testing import build_tiny_rm

BUCKET = "sparserm-test"


@pytest.fixture(scope="module")
def s3():
    """``uri(prefix)``: an ``s3://`` URI on a moto server of this module (bucket created)."""
    import moto.server as moto_server
    import pyarrow.fs as pafs

    # credentials: tests/conftest.py sets test ones before any Ray starts (the workers upload too)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    query = f"endpoint_override={host}:{port}&scheme=http"
    fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}?{query}&allow_bucket_creation=true")
    fs.create_dir(BUCKET)
    yield lambda prefix: f"s3://{BUCKET}/{prefix}?{query}"
    server.stop()


@pytest.fixture
def node(tmp_path, monkeypatch):
    """``node(name)``: this process becomes a node with its own empty local disk (SPARSERM_CACHE)."""
    def become(name: str):
        monkeypatch.setenv("SPARSERM_CACHE", str(tmp_path / name))
        return tmp_path / name

    return become


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_then_pull_on_another_node_gives_the_same_files(s3, node, tmp_path):
    home = s3("unit/a")
    node("a")
    src = storage.local_dir(home)
    (src / "sub").mkdir(parents=True)
    (src / "x.json").write_text('{"a": 1}')
    (src / "sub" / "w.bin").write_bytes(os.urandom(70_000))
    storage.push(home, src, marker="x.json")
    node("b")
    dst = storage.local_dir(home)
    assert dst != src and not dst.exists()
    assert storage.fetched(home) == dst and _tree(dst) == _tree(src)
    assert storage.pull(s3("unit/nothing"), storage.local_dir(s3("unit/nothing"))) is False
    with pytest.raises(FileNotFoundError, match="unit/nothing"):
        storage.fetched(s3("unit/nothing"))


def test_a_local_path_is_used_as_it_is(tmp_path):
    assert storage.local_dir(tmp_path) == tmp_path and storage.local_dir(f"file://{tmp_path}") == tmp_path
    assert storage.pull(str(tmp_path), tmp_path) is False
    storage.push(str(tmp_path), tmp_path)  # a no-op: nothing to copy anywhere
    with pytest.raises(ValueError, match="not inside the local mirror"):
        storage.push("s3://bucket/x", tmp_path)


def test_a_reward_model_on_s3_loads_on_a_node_that_never_saw_it(s3, node, tiny_model_dir):
    node("trainer")
    home = s3("models/rm")
    rm_dir = build_tiny_rm(storage.local_dir(home), model_dir=tiny_model_dir)
    storage.push(home, rm_dir)
    local = SparseRM.load(rm_dir)
    node("scorer")
    remote = SparseRM.load(home)
    assert remote.path != local.path and torch.equal(remote.dirs, local.dirs)
    texts = (["How do I bake bread?"] * 2, ["Mix flour and water, then bake.", "No."])
    assert remote.score(*texts) == pytest.approx(local.score(*texts), abs=1e-6)


def test_a_steering_map_on_s3_loads_on_a_node_that_never_saw_it_or_its_saes(s3, node, steer_map):
    import shutil

    from sparserm.steering.store import load_map

    node("builder")
    home = s3("maps/steer")
    storage.push(home, shutil.copytree(steer_map, storage.local_dir(home)))
    node("server")  # a node without the map or the SAE folders it was built from (both come from S3)
    remote = load_map(home)
    assert remote.folder == storage.local_dir(home) and remote.folder.parent.parent == node("server")
    assert remote.input.folder.startswith(str(remote.folder.resolve())) and remote.key == load_map(steer_map).key
    assert torch.equal(remote.cmap.dense(), load_map(steer_map).cmap.dense())
    from sparserm.steering.generate import SteeredGenerator

    gen = SteeredGenerator.load(home)  # what each replica of `sparserm serve steer s3://...` loads, and its name
    assert gen.map.key == remote.key and gen.hook.output_sae.d_sae == remote.output.d_sae
    assert storage.base_name(home) == "steer"


def test_event_files_a_worker_logs_into_a_runs_mirror_go_to_the_uri_from_its_own_node(s3, node):
    from sparserm.config import TrackingConfig
    from sparserm.testing import tensorboard_scalars
    from sparserm.tracking import Tracker, tracking_spec

    node("driver")
    home = s3("runs/tracked")
    spec = tracking_spec(TrackingConfig(), storage.local_dir(home) / "train" / "head" / "tensorboard", "test")
    assert spec["upload"] == (home, "train/head/tensorboard")
    node("worker")  # rank 0 on another node: it logs into the path it was given, on its own disk
    with Tracker(spec) as tracker:
        tracker.log({"loss": 0.5}, 1)
        tracker.log({"loss": 0.25}, 2)
    assert any("/train/head/tensorboard/events.out.tfevents." in p for p in _remote_files(s3("runs/tracked")))
    node("reader")  # neither the driver's push nor the worker's disk: the URI alone
    assert tensorboard_scalars(storage.fetched(home) / "train" / "head" / "tensorboard")["loss"] == [(1, 0.5),
                                                                                                    (2, 0.25)]
    assert tracking_spec(TrackingConfig(), "/tmp/plain/tensorboard", "test")["upload"] is None


def _pairs_file(path, n=40):
    rows = [{"prompt": f"Question {i}: how do I bake bread?", "chosen": f"Mix flour and water, step {i}.",
             "rejected": "I won't help with that." + " no" * (i % 3)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_second_run_on_another_node_reuses_the_first_runs_caches(s3, node, tmp_path, tiny_model_dir, ray_session,
                                                                   monkeypatch):
    import sparserm.features.extract as extract
    import sparserm.sae.stage as sae_stage

    passes, fits = [], []
    real_extract, real_fit = extract.extract_to_shards, sae_stage.train_sae
    monkeypatch.setattr(extract, "extract_to_shards", lambda rows, *a, **k: passes.append(len(rows)) or
                        real_extract(rows, *a, **k))
    monkeypatch.setattr(sae_stage, "train_sae", lambda *a, **k: fits.append(1) or real_fit(*a, **k))
    data = _pairs_file(tmp_path / "pairs.jsonl")
    overrides = [f"run.cache_dir={s3('cache')}", f"model.name={tiny_model_dir}", "model.layer=2", "model.max_tokens=32",
                 f"data.sources=[{{path: {data}}}]", "features.batch_size=8", "features.num_cpus=1",
                 "sae.width=64", "sae.k=4", "sae.batch_size=64", "sae.training_tokens=6400", "reward.top_k=8",
                 "reward.hidden=16", "reward.epochs=2"]
    node("a")
    assert main(["rm", "train", *overrides, "--output-dir", s3("runs/first")]) == 0
    assert (len(passes), len(fits)) == (1, 1)
    # written to S3 by the workers themselves: the actors' shards, Ray Train's epoch checkpoint of the head
    assert any(p.endswith(".parquet") and "/shards/" in p for p in _remote_files(s3("cache")))
    assert any("/train/head/epoch_0002/" in p for p in _remote_files(s3("runs/first")))
    node("b")  # another node: nothing on its disk, the same storage
    assert main(["sae", "train", *overrides, "--output-dir", s3("runs/second")]) == 0
    assert (len(passes), len(fits)) == (1, 1)  # no second model pass, no second fit: both caches came from S3
    first, second = storage.fetched(s3("runs/first")), storage.fetched(s3("runs/second"))
    assert second.parent.parent == first.parent.parent == tmp_path / "b"
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (first, second))
    assert m1["config"]["run"]["cache_dir"] == m2["config"]["run"]["cache_dir"] == s3("cache")
    quality, again = json.loads((first / "metrics.json").read_text())["sae"], json.loads((second / "sae_eval.json").read_text())
    assert quality == {k: again[k] for k in quality} and again["n_train_tokens"] > 0  # the same SAE, measured again
    node("c")  # the RM trained on node a, scored on a third node from S3 alone
    rm = SparseRM.load(s3("runs/first/rm"))
    texts = (["Question 1: how do I bake bread?"] * 2, ["Mix flour and water, step 1.", "I won't help with that."])
    assert rm.score(*texts) == pytest.approx(SparseRM.load(first / "rm").score(*texts), abs=1e-6)


def _remote_files(uri):
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    return [i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File]
