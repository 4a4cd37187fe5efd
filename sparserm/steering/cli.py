"""``sparserm steer ...`` subcommands: build (and audit), evaluate, audit, layers."""
from __future__ import annotations

import json
import sys


def add_steer_commands(sub, config_args, load) -> None:
    steer = sub.add_parser("steer", help="DSPA-style steering").add_subparsers(dest="action", required=True)
    p = steer.add_parser("build", help="the conditional-difference map from preference triples (steer.*): "
                                       "map.safetensors + densities.safetensors + manifest.json, then audit.md")
    config_args(p)
    p.set_defaults(func=lambda a: _build(a, load), stage="steer")
    p = steer.add_parser("evaluate", help="steered vs unsteered vs static: SparseRM win rate, TruthfulQA MC1/MC2, "
                                          "HH harmlessness, edit shares, FLOPs against DPO: steer_eval.md / .json")
    p.add_argument("map_dir")
    p.add_argument("overrides", nargs="*", help="key.sub=value on top of the map's config, e.g. steer.alpha=0.4")
    p.add_argument("--data", action="append", default=None,
                   help="evaluation data (repeatable; its eval split); default: the map's steer.data and data.sources")
    p.add_argument("--output-dir", default=None, help="where the report goes (default: the map folder)")
    p.add_argument("--json", action="store_true", help="print the report's rows and FLOP ratios as one JSON line")
    p.set_defaults(func=_evaluate)
    p = steer.add_parser("audit", help="the latents the map moves most, with top-activating snippets: audit.md")
    p.add_argument("map_dir")
    p.set_defaults(func=_audit)
    p = steer.add_parser("layers", help="input/output layers by measurement (steer.sweep_input_layers x "
                                        "steer.sweep_output_layers): layers.md / layers.json")
    config_args(p)
    p.set_defaults(func=lambda a: _layers(a, load), stage="steer-layers")


def _fail(exc) -> int:
    print(json.dumps({"error": str(exc)}), file=sys.stderr)
    return 1


def _errors() -> tuple:
    """What a steer command reports as ``{"error"}`` with exit status 1 (config errors: 2, by ``sparserm.cli``)."""
    from sparserm.data import DataError
    from sparserm.manifest import StaleArtifactError
    from sparserm.sae.autoencoder import SAELoadError

    return DataError, StaleArtifactError, SAELoadError, FileNotFoundError


def _build(args, load) -> int:
    from sparserm.steering.audit import write_audit
    from sparserm.steering.build import build_map

    cfg, out = load(args)
    try:
        map_dir = build_map(cfg, out)
        write_audit(map_dir)
    except _errors() as exc:
        return _fail(exc)
    manifest = json.loads((map_dir / "manifest.json").read_text())
    print(json.dumps({k: manifest["map"][k] for k in ("m_in", "m_out", "nnz", "n_triples", "n_rejected")}))
    print(map_dir)
    return 0


def _evaluate(args) -> int:
    from sparserm.config_build import apply_overrides
    from sparserm.steering.evaluate import run_steer_evaluate
    from sparserm.steering.store import load_map

    try:
        cfg = apply_overrides(load_map(args.map_dir).cfg, args.overrides)
        report = run_steer_evaluate(cfg, args.map_dir, args.output_dir, args.data)
    except _errors() as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps({"rows": report["rows"], "paired_differences": report["paired_differences"],
                          "flops": {n: {k: f[k] for k in ("dpo_over_build", "dpo_lora_over_build")}
                                    for n, f in report["flops"]["by_triples"].items()}}))
    else:
        print(args.output_dir or args.map_dir)
    return 0


def _audit(args) -> int:
    from sparserm.steering.audit import write_audit

    try:
        print(write_audit(args.map_dir))
    except _errors() as exc:
        return _fail(exc)
    return 0


def _layers(args, load) -> int:
    from sparserm.steering.layers import run_layer_sweep

    cfg, out = load(args)
    try:
        print(run_layer_sweep(cfg, out))
    except _errors() as exc:
        return _fail(exc)
    return 0
