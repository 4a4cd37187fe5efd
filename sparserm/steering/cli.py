"""``sparserm steer ...`` subcommands."""
from __future__ import annotations

import json
import sys


def add_steer_commands(sub, config_args, load) -> None:
    steer = sub.add_parser("steer", help="DSPA-style steering").add_subparsers(dest="action", required=True)
    p = steer.add_parser("build", help="the conditional-difference map from preference triples (steer.*): "
                                       "map.safetensors + manifest.json")
    config_args(p)
    p.set_defaults(func=lambda a: _build(a, load), stage="steer")


def _build(args, load) -> int:
    from sparserm.data import DataError
    from sparserm.manifest import StaleArtifactError
    from sparserm.steering.build import build_map

    cfg, out = load(args)
    try:
        map_dir = build_map(cfg, out)
    except (DataError, StaleArtifactError) as exc:
        print(json.dumps({"error": str(exc)}), file=sys.stderr)
        return 1
    manifest = json.loads((map_dir / "manifest.json").read_text())
    print(json.dumps({k: manifest["map"][k] for k in ("m_in", "m_out", "nnz", "n_triples", "n_rejected")}))
    print(map_dir)
    return 0
