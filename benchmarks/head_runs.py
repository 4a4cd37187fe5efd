"""Reward heads fitted in one Ray Train run (``train_heads``: one worker group, the heads one after another) against
one run per head (``train_head`` each), as ``rm sweep`` / ``rm ablate`` fitted them before: wall seconds of each
way in one process on one Ray, and their ratio. Both ways fit the same heads (each head equals its own run's,
which tests/reward/test_train_head.py checks); the gap is Ray Train's start-up per run (its controller, worker
and helper actors: new processes importing torch and Ray Train).

    python benchmarks/head_runs.py [--heads 6 --epochs 2 --pairs 400 --dim 32]

Sizes are a quick ablation's (six variants, two epochs); last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_info  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--pairs", type=int, default=400)
    p.add_argument("--dim", type=int, default=32)
    args = p.parse_args(argv)

    import ray
    import torch

    from sparserm.reward.train_head import HeadJob, train_head, train_heads

    g = torch.Generator().manual_seed(0)
    def pairs(n):
        x_l = torch.randn(n, args.dim, generator=g)
        return {"x_w": x_l + 0.3 + torch.randn(n, args.dim, generator=g) * 0.5, "x_l": x_l}
    train, val = pairs(args.pairs), pairs(args.pairs // 4)
    jobs = [HeadJob(f"h{i}", train, val, seed=i) for i in range(args.heads)]
    kw = dict(hidden=64, epochs=args.epochs, batch_size=64, progress=False)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        train_head(train, val, storage_dir=Path(tmp), name="warm-up", **kw)  # imports, first worker processes
        t0 = time.perf_counter()
        separate = [train_head(j.train, j.val, seed=j.seed, storage_dir=Path(tmp) / "separate", name=j.name, **kw)
                    for j in jobs]
        t_separate = time.perf_counter() - t0
        t0 = time.perf_counter()
        together = train_heads(jobs, storage_dir=Path(tmp), name="together", **kw)
        t_one_run = time.perf_counter() - t0
    same = all(a.history == b.history for a, b in zip(separate, together))
    ray.shutdown()
    out = {"heads": args.heads, "epochs": args.epochs, "seconds_one_run_per_head": round(t_separate, 2),
           "seconds_all_in_one_run": round(t_one_run, 2), "speedup": round(t_separate / t_one_run, 2),
           "seconds_saved_per_head": round((t_separate - t_one_run) / args.heads, 2), "same_histories": same,
           "cpu": cpu_info()}
    print(f"{args.heads} heads: one run each {t_separate:.1f} s, all in one run {t_one_run:.1f} s "
          f"({out['speedup']}x); histories equal: {same}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
