"""The Serve config of sparserm's two apps, as ``serve deploy`` and KubeRay's RayService (``serveConfigV2``) read
it, generated from the ``serve:`` section so that a RayService runs what ``sparserm serve all`` runs:

    python -m sparserm.serve.serve_config --rm-dir DIR --map-dir DIR [--config YAML] [--pip SPEC ...]
        [--env KEY=VALUE ...] [serve.key=value ...]

prints it as YAML. It holds ``http_options`` (``serve.host``, ``serve.port``) and one application per folder given:
the reward model (``rm``, at ``/rm`` beside the steered chat, else at ``/``) and the steered chat (``steer``, at
``/``). Each application names its builder by ``import_path`` (:mod:`sparserm.serve.builders`), hands it ``args``
(its folder and the resolved ``serve:`` section) and sets its one deployment's replicas, resources and limits to
what :func:`~sparserm.serve.options.deployment_options` gives the CLI's deployment; ``runtime_env`` (from ``--pip``
and ``--env``) is what the replicas install.
"""
from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

from sparserm.config import ServeConfig, to_dict
from sparserm.serve.options import deployment_options, validate_serve

RM_IMPORT_PATH = "sparserm.serve.builders:rm_app"
STEER_IMPORT_PATH = "sparserm.serve.builders:steer_app"
RM_DEPLOYMENT = "SparseRM"  # the deployment names of sparserm.serve.app and sparserm.serve.steer_app
STEER_DEPLOYMENT = "SparseRMSteer"

__all__ = ["serve_config", "application", "generate", "main", "RM_IMPORT_PATH", "STEER_IMPORT_PATH"]


def application(name: str, import_path: str, route_prefix: str, args: dict, deployment: str, cfg: ServeConfig,
                runtime_env: dict | None = None) -> dict:
    """One entry of ``applications``: its builder, the builder's args and its deployment's options."""
    app: dict[str, Any] = {"name": name, "route_prefix": route_prefix, "import_path": import_path, "args": args,
                           "deployments": [{"name": deployment, **deployment_options(cfg)}]}
    if runtime_env:
        app["runtime_env"] = copy.deepcopy(runtime_env)  # each app its own (no YAML anchors in the output)
    return app


def serve_config(cfg: ServeConfig, *, rm_dir: str | None = None, map_dir: str | None = None,
                 rm_name: str = "sparserm", steer_name: str = "sparserm-steer", rm_prefix: str | None = None,
                 steer_prefix: str = "/", runtime_env: dict | None = None) -> dict:
    """The Serve config (a plain dict) of the reward model at ``rm_dir`` and/or the steered chat at ``map_dir``.
    ``rm_prefix`` defaults to ``/rm`` with both apps (as ``sparserm serve all``) and ``/`` alone."""
    if rm_dir is None and map_dir is None:
        raise ValueError("serve_config: give rm_dir, map_dir or both")
    cfg = validate_serve(cfg)
    apps = []
    if rm_dir is not None:
        prefix = rm_prefix or ("/rm" if map_dir is not None else "/")
        apps.append(application(rm_name, RM_IMPORT_PATH, prefix, {"rm_dir": str(rm_dir), "serve": to_dict(cfg)},
                                RM_DEPLOYMENT, cfg, runtime_env))
    if map_dir is not None:
        apps.append(application(steer_name, STEER_IMPORT_PATH, steer_prefix,
                                {"map_dir": str(map_dir), "serve": to_dict(cfg)}, STEER_DEPLOYMENT, cfg,
                                runtime_env))
    return {"http_options": {"host": cfg.host, "port": cfg.port}, "applications": apps}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparserm.serve.serve_config", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="serve.key=value overrides, e.g. serve.host=0.0.0.0")
    p.add_argument("--rm-dir", default=None, help="reward-model folder, as the replicas see it")
    p.add_argument("--map-dir", default=None, help="steering-map folder, as the replicas see it")
    p.add_argument("--config", default=None, help="YAML file; its serve: section is read")
    p.add_argument("--rm-prefix", default=None)
    p.add_argument("--steer-prefix", default="/")
    p.add_argument("--pip", action="append", default=[], help="a pip requirement of the apps' runtime_env "
                                                              "(repeatable), e.g. a sparserm wheel")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE of the apps' runtime_env (repeatable)")
    return p


def generate(argv: list[str]) -> dict:
    """The Serve config the command line ``argv`` (``python -m sparserm.serve.serve_config`` ARGS) describes."""
    from sparserm.serve.config import load_serve_config

    args = _parser().parse_args(argv)
    runtime_env: dict[str, Any] = {}
    if args.pip:
        runtime_env["pip"] = list(args.pip)
    if args.env:
        bad = [kv for kv in args.env if "=" not in kv]
        if bad:
            raise SystemExit(f"--env {bad[0]!r}: expected NAME=VALUE")
        runtime_env["env_vars"] = dict(kv.split("=", 1) for kv in args.env)
    return serve_config(load_serve_config(args.config, args.overrides), rm_dir=args.rm_dir, map_dir=args.map_dir,
                        rm_prefix=args.rm_prefix, steer_prefix=args.steer_prefix, runtime_env=runtime_env or None)


def main(argv: list[str] | None = None) -> int:
    import yaml

    print(yaml.safe_dump(generate(sys.argv[1:] if argv is None else argv), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
