"""Serve application builders, named by ``import_path`` in a Serve config (``serve deploy``, KubeRay's RayService
``serveConfigV2``, :mod:`sparserm.serve.serve_config`) or on ``serve run``'s command line:

* ``sparserm.serve.builders:rm_app``, args ``{"rm_dir": DIR, "serve": {...}}``: the reward-model app;
* ``sparserm.serve.builders:steer_app``, args ``{"map_dir": DIR, "serve": {...}}``: the steered chat app.

``serve`` holds the ``serve:`` section of the config tree (any of its keys; the rest at their defaults). Each
builder returns the app ``sparserm serve rm`` / ``serve steer`` deploys (:func:`sparserm.serve.app.build_app`,
:func:`sparserm.serve.steer_app.build_steer_app`), with the bearer token read from ``serve.auth_env`` in the process
that builds it. ``serve run sparserm.serve.builders:rm_app rm_dir=DIR`` runs it with the default ``serve:`` section.
"""
from __future__ import annotations

from typing import Any

from sparserm.config import ConfigError, ServeConfig, build

__all__ = ["rm_app", "steer_app", "serve_section"]


def serve_section(args: dict[str, Any], folder_key: str) -> ServeConfig:
    """The validated ``serve:`` section of a builder's ``args``; unknown keys are refused, naming the key."""
    from sparserm.serve.options import validate_serve

    unknown = set(args) - {folder_key, "serve"}
    if unknown or folder_key not in args:
        raise ConfigError(f"application args take {folder_key!r} and 'serve', got {sorted(args)}")
    return validate_serve(build(ServeConfig, args.get("serve") or {}, "serve"))


def rm_app(args: dict):
    """The reward-model application of ``args["rm_dir"]`` (a SparseRM folder)."""
    from sparserm.serve.app import build_app

    return build_app(args.get("rm_dir"), serve_section(args, "rm_dir"))


def steer_app(args: dict):
    """The steered chat application of ``args["map_dir"]`` (a steering-map folder from ``sparserm steer build``)."""
    from sparserm.serve.steer_app import build_steer_app

    return build_steer_app(args.get("map_dir"), serve_section(args, "map_dir"))
