"""``sparserm rm ...`` subcommands."""
from __future__ import annotations

import json
from pathlib import Path


def add_rm_commands(sub, config_args, load) -> None:
    rm = sub.add_parser("rm", help="SparseRM reward model").add_subparsers(dest="action", required=True)

    p = rm.add_parser("train", help="features, SAE, directions, head: the reward-model folder")
    config_args(p)
    p.set_defaults(func=lambda a: _train(a, load), stage="rm")

    p = rm.add_parser("ablate", help="directions vs random vs raw SAE vs dense, losses, length baseline")
    config_args(p)
    p.set_defaults(func=lambda a: _ablate(a, load), stage="rm-ablate")

    p = rm.add_parser("sweep", help="choose layer L (model.layer + model.extra_layers) and K (reward.sweep_k) "
                                    "on validation data")
    config_args(p)
    p.set_defaults(func=lambda a: _sweep(a, load), stage="rm-sweep")

    p = rm.add_parser("evaluate", help="accuracy of a reward-model folder on a preference file")
    p.add_argument("rm_dir")
    p.add_argument("data")
    p.add_argument("--format", default="auto")
    p.add_argument("--max-pairs", type=int, default=None)
    p.add_argument("--output-dir", default=None)
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    p.set_defaults(func=_evaluate)


def _train(args, load) -> int:
    from sparserm.reward.stage import run_rm_train

    cfg, out = load(args)
    rm_dir = run_rm_train(cfg, out)
    print(rm_dir)
    return 0


def _ablate(args, load) -> int:
    from sparserm.reward.ablate import run_ablation

    cfg, out = load(args)
    print(run_ablation(cfg, out))
    return 0


def _sweep(args, load) -> int:
    from sparserm.reward.sweep import run_sweep

    cfg, out = load(args)
    print(run_sweep(cfg, out))
    return 0


def _evaluate(args) -> int:
    from sparserm.data import DataError
    from sparserm.reward.evaluate import evaluate_rm

    try:
        result = evaluate_rm(args.rm_dir, args.data, args.format, args.max_pairs,
                             Path(args.output_dir) if args.output_dir else None)
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0
