"""``sparserm align CONFIG [overrides]``: the iterative alignment job (resumes in the same --output-dir)."""
from __future__ import annotations

import time
from pathlib import Path


def run_align(cfg, out: Path, stop_after: tuple[int, str] | None = None) -> dict:
    from sparserm.align.report import write_report
    from sparserm.align.rounds import AlignJob, log
    from sparserm.manifest import write_manifest
    from sparserm.reward.train_head import ensure_ray

    t0 = time.time()
    ensure_ray(cfg.run.ray_address)
    rm_dir = cfg.align.rm_dir
    if rm_dir is None:
        rm_dir = str(out / "reward_model" / "rm")
        if not Path(rm_dir, "rm.json").is_file():
            from sparserm.reward.stage import run_rm_train

            log("align.rm_dir is not set: training the reward model of this config first (cached features)")
            rm_dir = str(run_rm_train(cfg, out / "reward_model"))
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, cfg, "align", extra={"rm_dir": rm_dir})
    result = AlignJob(cfg, out, rm_dir, stop_after=stop_after).run()
    if not result["stopped"]:
        timings = {**result.get("timings", {}), "this_invocation": round(time.time() - t0, 1)}
        report = write_report(out, result["rows"], timings)
        log(f"finished in {timings['this_invocation']} s; report: {report}")
    return result


def _align(args, load) -> int:
    cfg, out = load(args)
    run_align(cfg, out)
    print(out)
    return 0


def add_align_command(sub, config_args, load) -> None:
    p = sub.add_parser("align", help="iterative alignment: generate, filter by SparseRM, DPO with LoRA, per round")
    config_args(p)
    p.set_defaults(func=lambda a: _align(a, load), stage="align")
