"""A tiny reward model and a steered chat app on the tiny model, served on 127.0.0.1 while this folder's tests run,
all on one HTTP proxy (``serve_port``). The apps are package-scoped (this folder has an ``__init__.py`` for that):
Serve shuts down after the folder's last test, so its replicas hold no CPUs of the session's Ray for later tests.

* ``sparserm`` at ``/``: no auth, over-long texts rejected (413).
* ``sparserm-auth`` at ``/auth``: bearer token (from the environment), over-long texts truncated and reported.
* ``steer_service`` (started only when a test asks for it): the steered chat at ``/steer`` with a reward model at
  ``/both/rm``, both started as ``sparserm serve all`` does, with the bearer token.
All with small limits so the 413 paths are cheap to hit.
"""
from __future__ import annotations

import socket

import pytest

TOKEN = "test-token-123"
LIMITS = dict(max_items_per_request=8, max_text_chars=400, max_batch_size=4, num_cpus=0.25)
# chat prompts for the steered chat tests
ASK = [{"role": "user", "content": "How do I bake bread?"}]
JOKE = [{"role": "user", "content": "Tell me a joke about the capital of France, please, a long one."}]


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
def serve_port() -> int:
    return free_port()


@pytest.fixture(scope="package")
def service(ray_session, rm_dir, serve_port):
    """Started through :func:`sparserm.serve.app.start`, as ``sparserm serve rm`` does; the second app reads its
    token from the environment variable ``serve.auth_env``, the first is started with auth off."""
    from dataclasses import replace

    from ray import serve

    from sparserm.serve.app import start
    from sparserm.serve.config import ServeConfig

    cfg = ServeConfig(port=serve_port, **LIMITS)
    start(rm_dir, cfg, name="sparserm", token=None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(cfg.auth_env, TOKEN)
        start(rm_dir, replace(cfg, overlong="truncate"), name="sparserm-auth", route_prefix="/auth")
    base = f"http://127.0.0.1:{cfg.port}"
    yield {"url": base, "auth_url": base + "/auth", "token": TOKEN, "app": "sparserm", "cfg": cfg}
    serve.shutdown()


@pytest.fixture(scope="package")
def steer_service(ray_session, rm_dir, steer_map, serve_port):
    """The session's steering map at ``/steer`` and a reward model at ``/both/rm``, started through
    :func:`sparserm.serve.steer_app.start_all` as ``sparserm serve all`` does, with the token from the environment."""
    from ray import serve

    from sparserm.serve.config import ServeConfig
    from sparserm.serve.steer_app import start_all

    cfg = ServeConfig(port=serve_port, **LIMITS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(cfg.auth_env, TOKEN)
        start_all(rm_dir, steer_map, cfg, rm_prefix="/both/rm", steer_prefix="/steer", rm_name="both-rm",
                  steer_name="steer")
    base = f"http://127.0.0.1:{cfg.port}"
    yield {"url": base + "/steer", "rm_url": base + "/both/rm", "token": TOKEN, "map_dir": steer_map, "cfg": cfg}
    serve.shutdown()


@pytest.fixture(scope="package")
def steer_client(steer_service):
    """The official ``openai`` client on the steered chat app, with its token and no retries."""
    import openai

    return openai.OpenAI(base_url=steer_service["url"] + "/v1", api_key=steer_service["token"], max_retries=0,
                         timeout=120)
