"""Stage ``rm train``: features -> SAE -> frequencies -> top-K directions -> head (Ray Train) -> RM folder.

Writes into the run folder: ``rm/`` (the reward model), ``metrics.json`` (held-out accuracy per source,
SAE quality, best epoch), ``latents.json`` / ``report.md`` with figures, ``train/`` (Ray Train
checkpoints; a rerun with the same ``--output-dir`` resumes there) and ``manifest.json``.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from sparserm.config import Config
from sparserm.manifest import write_json, write_manifest
from sparserm.reward.accuracy import pair_accuracy
from sparserm.reward.inputs import head_inputs
from sparserm.reward.model import save_rm
from sparserm.reward.prepare import PairSet, RewardData, prepare_reward_data
from sparserm.reward.train_head import HeadJob, TrainHeadResult, train_heads


def head_job(cfg: Config, rd: RewardData, name: str, *, inputs: str = "topk", loss: str | None = None,
             seed: int | None = None) -> HeadJob:
    """A head on ``rd``'s train/val pairs: ``inputs`` (``sparserm.reward.inputs``), the loss and seed of ``cfg``
    unless given."""
    return HeadJob(name, head_inputs(inputs, rd, rd.train), head_inputs(inputs, rd, rd.val), loss or cfg.reward.loss,
                   cfg.run.seed if seed is None else seed)


def fit_heads(cfg: Config, jobs: list[HeadJob], out_dir: Path, name: str,
              progress: bool = True) -> list[TrainHeadResult]:
    """``jobs`` in one Ray Train run ``<out_dir>/train/<name>``, with ``cfg.reward``'s settings and resources."""
    r = cfg.reward
    return train_heads(jobs, margin=r.margin, hidden=r.hidden, epochs=r.epochs, lr=r.lr, weight_decay=r.weight_decay,
                       batch_size=r.batch_size, num_workers=r.num_workers, num_cpus=r.num_cpus, num_gpus=r.num_gpus,
                       patience=r.patience, storage_dir=out_dir / "train", name=name, progress=progress,
                       ray_address=cfg.run.ray_address, max_failures=cfg.run.max_failures, tracking=cfg.tracking)


def fit_head(cfg: Config, rd: RewardData, out_dir: Path, *, name: str = "head",
             progress: bool = True) -> TrainHeadResult:
    return fit_heads(cfg, [head_job(cfg, rd, name)], out_dir, name, progress)[0]


def accuracy_by_source(s_w: torch.Tensor, s_l: torch.Tensor, pairs: PairSet) -> dict[str, float]:
    out = {"all": pair_accuracy(s_w, s_l)}
    for src in sorted(set(pairs.source.tolist())):
        m = torch.as_tensor(pairs.source == src)
        out[str(src)] = pair_accuracy(s_w[m], s_l[m])
    return out


def head_scores(result: TrainHeadResult, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return result.head(x["x_w"]), result.head(x["x_l"])


def evaluate_head(result: TrainHeadResult, x: dict[str, torch.Tensor], pairs: PairSet) -> dict[str, float]:
    return accuracy_by_source(*head_scores(result, x), pairs)


def sae_info(cfg: Config, rd: RewardData) -> dict:
    info = {"source": cfg.sae.source, "release": cfg.sae.release, "sae_id": cfg.sae.sae_id,
            "path": str(rd.sae_dir) if rd.sae_dir else cfg.sae.path, "d_sae": int(rd.sae.d_sae)}
    return {**info, "neuronpedia_id": getattr(rd.sae, "neuronpedia_id", None)}


def run_rm_train(cfg: Config, out_dir: Path) -> Path:
    t0 = time.time()
    rd = prepare_reward_data(cfg, out_dir)
    t_prep = time.time() - t0
    result = fit_head(cfg, rd, out_dir)
    eval_acc = evaluate_head(result, head_inputs("topk", rd, rd.eval), rd.eval)
    rm_dir = save_rm(out_dir / "rm", model_cfg=cfg.model, head=result.head, dirs=rd.dirs, pos_ids=rd.pos_ids,
                     neg_ids=rd.neg_ids, mu_w=rd.freqs.mu_w, mu_l=rd.freqs.mu_l, sae_info=sae_info(cfg, rd),
                     extra={"loss": cfg.reward.loss, "best_epoch": result.best_epoch, "eval_accuracy": eval_acc})
    metrics = {"eval_accuracy": eval_acc, "n_pairs": {"train": len(rd.train), "val": len(rd.val), "eval": len(rd.eval)},
               "best_epoch": result.best_epoch, "history": result.history, "placements": result.placements,
               "sae": rd.sae_metrics,
               "activation_cache": rd.cache.summary, "seconds": {"features_and_sae": round(t_prep, 1),
                                                                 "total": round(time.time() - t0, 1)}}
    write_json(out_dir / "metrics.json", metrics)
    from sparserm.reward.report import write_report

    write_report(out_dir, cfg, rd, result, metrics)
    write_manifest(out_dir, cfg, "rm", inputs=rd.cache.summary.get("inputs", {}),
                   extra={"activation_cache": str(rd.cache.root), "sae_dir": str(rd.sae_dir), "rm_dir": str(rm_dir)})
    print(f"[rm] held-out accuracy {', '.join(f'{k}={v:.3f}' for k, v in eval_acc.items())}", flush=True)
    return rm_dir


def length_baseline(pairs: PairSet) -> dict[str, float]:
    """Accuracy of "the longer response is preferred" (ties count as wrong)."""
    return accuracy_by_source(torch.as_tensor(pairs.len_w, dtype=torch.float32),
                              torch.as_tensor(pairs.len_l, dtype=torch.float32), pairs)

