"""A tiny reward model served on 127.0.0.1 for the whole session: two apps on one HTTP proxy.

* ``sparserm`` at ``/``: no auth, over-long texts rejected (413).
* ``sparserm-auth`` at ``/auth``: bearer token (from the environment), over-long texts truncated and reported.
Both with small limits so the 413 paths are cheap to hit.
"""
from __future__ import annotations

import socket

import pytest

TOKEN = "test-token-123"
LIMITS = dict(max_items_per_request=8, max_text_chars=400, max_batch_size=4, num_cpus=0.25)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def rm_dir(tiny_model_dir, tmp_path_factory):
    from sparserm.testing import build_tiny_rm

    return build_tiny_rm(tmp_path_factory.mktemp("serve") / "rm", model_dir=tiny_model_dir)


@pytest.fixture(scope="session")
def rm(rm_dir):
    from sparserm.reward.model import SparseRM

    return SparseRM.load(rm_dir)


@pytest.fixture(scope="session")
def service(ray_session, rm_dir):
    """Started through :func:`sparserm.serve.app.start`, as ``sparserm serve rm`` does; the second app reads its
    token from the environment variable ``serve.auth_env``, the first is started with auth off."""
    from dataclasses import replace

    from ray import serve

    from sparserm.serve.app import start
    from sparserm.serve.config import ServeConfig

    cfg = ServeConfig(port=free_port(), **LIMITS)
    start(rm_dir, cfg, name="sparserm", token=None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(cfg.auth_env, TOKEN)
        start(rm_dir, replace(cfg, overlong="truncate"), name="sparserm-auth", route_prefix="/auth")
    base = f"http://127.0.0.1:{cfg.port}"
    yield {"url": base, "auth_url": base + "/auth", "token": TOKEN, "app": "sparserm", "cfg": cfg}
    serve.shutdown()
