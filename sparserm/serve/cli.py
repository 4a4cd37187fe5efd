"""``sparserm serve rm RM_DIR``, ``serve steer MAP_DIR`` and ``serve all RM_DIR MAP_DIR``, each with
``[--host] [--port] [--replicas N] [--config YAML] [serve.key=value ...]``.

Starts (or joins, with ``--address``/``RAY_ADDRESS``) Ray, starts Serve's HTTP proxy on host:port, deploys the
app(s) (``serve all``: the reward model at ``--rm-prefix``, default ``/rm``, the steered chat at
``--steer-prefix``, default ``/``), prints the URL and routes and blocks until Ctrl-C or SIGTERM, then deletes the
app(s) (and shuts Serve down when the Ray instance is its own). The bearer token, if any, is read from the
environment variable ``serve.auth_env`` (default ``SPARSERM_SERVE_TOKEN``).
"""
from __future__ import annotations

import json
import os
import signal
import time


def _serve_config(args):
    import dataclasses

    from sparserm.serve.config import load_serve_config
    from sparserm.serve.options import validate_serve

    cfg = load_serve_config(args.config, list(args.overrides))
    changes = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if args.replicas is not None:
        changes.update(replicas=args.replicas, autoscaling=None)
    return validate_serve(dataclasses.replace(cfg, **changes))


def _serve(args, deploy) -> int:
    """Start or join Ray, ``deploy(cfg)`` -> {app name: (route prefix, routes)}, print, block, clean up."""
    import ray
    from ray import serve

    cfg = _serve_config(args)
    own_ray = not ray.is_initialized() and args.address is None and not os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        ray.init(address=args.address, include_dashboard=False)
    apps = deploy(cfg)
    url = f"http://{cfg.host}:{cfg.port}"
    routes = [prefix.rstrip("/") + r for prefix, paths in apps.values() for r in paths]
    print(json.dumps({"url": url, "apps": {name: prefix for name, (prefix, _) in apps.items()}, "routes": routes}))
    print(url, flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):  # a background `&` start ignores SIGINT; a scheduler sends TERM
        signal.signal(sig, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for name in apps:
            serve.delete(name)
        if own_ray:
            serve.shutdown()
    return 0


def _rm_routes() -> list[str]:
    from sparserm.serve.app import POST_ROUTES

    return [path for path, *_ in POST_ROUTES] + ["/healthz", "/docs"]


def cmd_serve_rm(args) -> int:
    from sparserm.serve.app import start

    def deploy(cfg):
        start(args.rm_dir, cfg, name=args.name)
        return {args.name: ("/", _rm_routes())}

    return _serve(args, deploy)


def cmd_serve_steer(args) -> int:
    from sparserm.serve.steer_app import ROUTES, start_steer

    def deploy(cfg):
        start_steer(args.map_dir, cfg, name=args.name)
        return {args.name: ("/", list(ROUTES))}

    return _serve(args, deploy)


def cmd_serve_all(args) -> int:
    from sparserm.serve.steer_app import ROUTES, start_all

    def deploy(cfg):
        start_all(args.rm_dir, args.map_dir, cfg, rm_prefix=args.rm_prefix, steer_prefix=args.steer_prefix,
                  rm_name=args.rm_name, steer_name=args.steer_name)
        return {args.rm_name: (args.rm_prefix, _rm_routes()), args.steer_name: (args.steer_prefix, list(ROUTES))}

    return _serve(args, deploy)


def _common(p) -> None:
    p.add_argument("overrides", nargs="*", help="serve.key=value overrides after the folder(s), e.g. "
                                                "serve.max_batch_size=32")
    p.add_argument("--host", default=None, help="bind address (default from config: 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default from config: 8000)")
    p.add_argument("--replicas", type=int, default=None, help="fixed replica count (overrides autoscaling)")
    p.add_argument("--config", default=None, help="YAML file; its serve: section is read")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or a local Ray)")


def add_serve_commands(sub) -> None:
    """Add ``serve rm``, ``serve steer`` and ``serve all`` to the ``sparserm`` sub-command parser ``sub``."""
    serve_p = sub.add_parser("serve", help="serve models over HTTP with Ray Serve")
    actions = serve_p.add_subparsers(dest="action", required=True)
    rm_help = "reward-model folder (rm.json, directions.safetensors, head/)"
    map_help = "steering-map folder (manifest.json, map.safetensors) from `sparserm steer build`"
    p = actions.add_parser("rm", help="serve a SparseRM reward-model folder (blocks; Ctrl-C stops)")
    p.add_argument("rm_dir", help=rm_help)
    _common(p)
    p.add_argument("--name", default="sparserm", help="Serve application name for DeploymentHandle clients "
                                                      "(default: sparserm)")
    p.set_defaults(func=cmd_serve_rm)
    p = actions.add_parser("steer", help="serve steered chat completions (OpenAI API) over a steering map (blocks)")
    p.add_argument("map_dir", help=map_help)
    _common(p)
    p.add_argument("--name", default="sparserm-steer", help="Serve application name (default: sparserm-steer)")
    p.set_defaults(func=cmd_serve_steer)
    p = actions.add_parser("all", help="serve the reward model and the steered chat together (blocks)")
    p.add_argument("rm_dir", help=rm_help)
    p.add_argument("map_dir", help=map_help)
    _common(p)
    p.add_argument("--rm-prefix", default="/rm", help="route prefix of the reward model (default: /rm)")
    p.add_argument("--steer-prefix", default="/", help="route prefix of the steered chat (default: /)")
    p.add_argument("--rm-name", default="sparserm", help="Serve application name of the reward model")
    p.add_argument("--steer-name", default="sparserm-steer", help="Serve application name of the steered chat")
    p.set_defaults(func=cmd_serve_all)
