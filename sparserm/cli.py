"""``sparserm``: thin command line. Parse, load the config, call a stage, print the output path last."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sparserm.config import ConfigError, load_config


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (e.g. jobs/configs/quickstart.yaml); defaults if omitted")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. model.layer=12")
    p.add_argument("--output-dir", default=None, help="where to write (default: a new folder under runs/)")


def _load(args) -> "tuple":
    """(config, local output folder); ``args.output_home`` keeps where the outputs live, pushed there by
    :func:`main` when the command ends (a storage URI; a local path is the folder itself)."""
    from sparserm.manifest import make_run_dir, run_home

    config, overrides = args.config, list(args.overrides)
    # no config file, only overrides (a path with "=" in a folder name is still a path: its key has a "/")
    if config is not None and "=" in config and not Path(config).is_file() and "/" not in config.split("=")[0]:
        config, overrides = None, [config, *overrides]
    cfg = load_config(config, overrides)
    args.output_home = run_home(cfg, args.stage, args.output_dir)
    return cfg, make_run_dir(cfg, args.stage, args.output_home)


def cmd_data_check(args) -> int:
    from sparserm.data import DataError, check

    try:
        summary = check(args.path, args.format, Path(args.output_dir) if args.output_dir else None)
    except DataError as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    print(json.dumps(summary, indent=2))
    return 0


def cmd_features(args) -> int:
    from sparserm.features.stage import run_features
    from sparserm.manifest import write_manifest

    cfg, out = _load(args)
    cache = run_features(cfg, out)
    write_manifest(out, cfg, "features", inputs=cache.summary.get("inputs", {}),
                   extra={"activation_cache": str(cache.root), "cache": cache.summary})
    print(cache.root)
    return 0


def cmd_sae_train(args) -> int:
    from sparserm.sae.stage import run_sae_stage

    cfg, out = _load(args)
    sae_dir, metrics = run_sae_stage(cfg, out)
    print(json.dumps(metrics, indent=2))
    print(sae_dir)
    return 0


def cmd_sae_evaluate(args) -> int:
    from sparserm.sae.stage import evaluate_sae_dir

    print(json.dumps(evaluate_sae_dir(Path(args.sae_dir)), indent=2))
    return 0


def cmd_fpo(args) -> int:
    from sparserm.fpo.compare import run_fpo_compare

    cfg, out = _load(args)
    run_fpo_compare(cfg, out)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparserm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="preference data").add_subparsers(dest="action", required=True)
    p = data.add_parser("check", help="count valid and rejected pairs of a file; JSON summary")
    p.add_argument("path")
    p.add_argument("--format", default="auto")
    p.add_argument("--output-dir", default=None)
    p.set_defaults(func=cmd_data_check)

    p = sub.add_parser("features", help="one truncated model pass over the data into the activation cache")
    _config_args(p)
    p.set_defaults(func=cmd_features, stage="features")

    sae = sub.add_parser("sae", help="sparse autoencoders").add_subparsers(dest="action", required=True)
    p = sae.add_parser("train", help="load or train the configured SAE (features pass included, cached)")
    _config_args(p)
    p.set_defaults(func=cmd_sae_train, stage="sae")
    p = sae.add_parser("evaluate", help="fvu, fvu_all, l0, dead_fraction on held-out activations; JSON")
    p.add_argument("sae_dir")
    p.set_defaults(func=cmd_sae_evaluate)

    from sparserm.reward.cli import add_rm_commands

    add_rm_commands(sub, _config_args, _load)

    from sparserm.align.cli import add_align_command

    add_align_command(sub, _config_args, _load)

    p = sub.add_parser("fpo", help="FPO against DPO, SimPO and TDPO-2 (fpo.methods) on the same pairs and steps: "
                                    "fpo.json / fpo.md")
    _config_args(p)
    p.set_defaults(func=cmd_fpo, stage="fpo")

    from sparserm.steering.cli import add_steer_commands

    add_steer_commands(sub, _config_args, _load)

    from sparserm.serve.cli import add_serve_commands

    add_serve_commands(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with ``key.sub=value`` overrides anywhere after the config (``c.yaml --output-dir D k=v``
    as well as ``c.yaml k=v --output-dir D``: argparse alone refuses the first)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*(args.overrides or []), *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    from sparserm.storage import local_dir, push

    args = parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    finally:  # outputs on a storage URI: pushed whether the stage finished or not, so a rerun resumes them
        home = getattr(args, "output_home", None)
        if home is not None:
            push(home, local_dir(home))


if __name__ == "__main__":
    sys.exit(main())
