"""``sparserm serve rm RM_DIR [--host] [--port] [--replicas N] [--config YAML] [serve.key=value ...]``.

Starts (or joins, with ``--address``/``RAY_ADDRESS``) Ray, starts Serve's HTTP proxy on host:port, deploys the
reward-model app, prints its URL and blocks until Ctrl-C or SIGTERM, then deletes the app (and shuts Serve down when
the Ray instance is its own). The bearer token, if any, is read from the environment variable ``serve.auth_env``
(default ``SPARSERM_SERVE_TOKEN``).
"""
from __future__ import annotations

import json
import os
import signal
import time


def cmd_serve_rm(args) -> int:
    import dataclasses

    import ray
    from ray import serve

    from sparserm.serve.app import POST_ROUTES, start
    from sparserm.serve.config import load_serve_config
    from sparserm.serve.options import validate_serve

    config, overrides = args.config, list(args.overrides)
    cfg = load_serve_config(config, overrides)
    changes = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if args.replicas is not None:
        changes.update(replicas=args.replicas, autoscaling=None)
    cfg = validate_serve(dataclasses.replace(cfg, **changes))
    own_ray = not ray.is_initialized() and args.address is None and not os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        ray.init(address=args.address, include_dashboard=False)
    start(args.rm_dir, cfg, name=args.name)
    url = f"http://{cfg.host}:{cfg.port}"
    routes = [path for path, *_ in POST_ROUTES] + ["/healthz", "/docs"]
    print(json.dumps({"url": url, "app": args.name, "routes": routes}))
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
        serve.delete(args.name)
        if own_ray:
            serve.shutdown()
    return 0


def add_serve_commands(sub) -> None:
    """Add ``serve rm`` to the ``sparserm`` sub-command parser ``sub``."""
    serve_p = sub.add_parser("serve", help="serve models over HTTP with Ray Serve")
    actions = serve_p.add_subparsers(dest="action", required=True)
    p = actions.add_parser("rm", help="serve a SparseRM reward-model folder (blocks; Ctrl-C stops)")
    p.add_argument("rm_dir", help="reward-model folder (rm.json, directions.safetensors, head/)")
    p.add_argument("overrides", nargs="*", help="serve.key=value overrides right after RM_DIR, e.g. serve.max_batch_size=32")
    p.add_argument("--host", default=None, help="bind address (default from config: 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default from config: 8000)")
    p.add_argument("--replicas", type=int, default=None, help="fixed replica count (overrides autoscaling)")
    p.add_argument("--config", default=None, help="YAML file; its serve: section is read")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--name", default="sparserm", help="Serve application name for DeploymentHandle clients "
                                                      "(default: sparserm)")
    p.set_defaults(func=cmd_serve_rm)
