"""Train reward heads with Ray Train (``TorchTrainer``; gloo on CPU, DDP via ``prepare_model``).

A run trains one or more jobs (:class:`HeadJob`: pairs, loss, seed) one after another in one worker group, so a
sweep or an ablation pays Ray Train's start-up (~8 s on 2 cores) once. Each epoch of a job every worker trains on
its shard of the training pairs, evaluates the whole (small) validation set, and all call ``ray.train.report``;
rank 0 attaches a checkpoint folder (``sparserm.train_state.report_epoch``), NNNN counting the run's reports
(a run of one job: its epoch):

    epoch_NNNN/last/{head.safetensors,head.json}   the reported job's weights after this epoch
    epoch_NNNN/best/{head.safetensors,head.json}   its best weights so far (val accuracy, ties: lower val loss)
    epoch_NNNN/optimizer/rank_0.{safetensors,json} its AdamW state (``sparserm.align.optimizer_state``; every DDP
                                                   rank holds the full state, so one file: rank 0, world 1)
    epoch_NNNN/done/<job>/best/                    the best head of each job finished before it
    epoch_NNNN/state.json                          epoch, job, best_epoch, history, fingerprint, done (each
                                                   finished job's best_epoch and history) (, stopped_early_at)

Only the latest checkpoint is kept. Resume: a run with the same ``storage_dir``/``name`` finds Ray Train's run
snapshot there, so ``ray.train.get_checkpoint()`` returns the last report; the workers skip the finished jobs,
reload the reported one's head, optimizer state, history and best head and continue at its next epoch. The
shuffle of epoch e depends only on (seed, e), so a resumed run repeats exactly what an uninterrupted one would,
and so does a run whose worker died mid-epoch: Ray Train restarts the worker group from that checkpoint
(``max_failures`` times). A stored run whose settings or data differ (``fingerprint``) is refused rather than
silently continued. A checkpoint of before the shared optimizer format resumes with its head, history and best
head, and its optimizer moments restart (the worker prints why).

Early stopping (``patience`` > 0, ``reward.patience``): a job stops once its best epoch has not improved for
``patience`` epochs; its head is still the best epoch's, and its last history row and result carry
``stopped_early_at``. ``patience`` is not in the fingerprint (like ``epochs``: when to stop, not what an epoch
computes). Tracking (``tracking``, ``sparserm.tracking``): rank 0 logs each step's loss (``step/loss``) and each
epoch's row (``epoch/<key>``, at the epoch's last step) at global steps into ``<storage_dir>/<name>/tensorboard/``
(a run of several jobs: ``.../tensorboard/<job>``; and MLflow when configured); a resumed run logs only what it trains.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sparserm.align.optimizer_state import load_optimizer_state, save_optimizer_state
from sparserm.ray_train import ensure_ray, final_checkpoint, fit_polling, quiet_worker_logs, run_config
from sparserm.reward.accuracy import pair_accuracy
from sparserm.reward.head import RewardHead, head_state, load_head, save_head
from sparserm.reward.losses import get_loss
from sparserm.tracking import Tracker, tracking_spec
from sparserm.train_state import (OPTIMIZER_DIR, EarlyStopping, all_reduced, epoch_order, rank_placements,
                                  refuse_other_run, report_epoch, resumed_checkpoint)

__all__ = ["TrainHeadResult", "HeadJob", "train_head", "train_heads"]


@dataclass
class TrainHeadResult:
    head: RewardHead  # weights of best_epoch, on CPU, eval mode
    best_epoch: int  # 1-based
    history: list[dict]  # one dict per finished epoch: epoch, train_loss, val_loss, val_accuracy
    checkpoint_dir: Path  # the run's latest checkpoint folder (its best/ holds ``head``)
    finished: bool = True  # False when stopped by ``stop_after_epoch`` before ``epochs``
    start_epoch: int = 1  # the first epoch this call trained (> 1 after a resume; epochs + 1: nothing left)
    stopped_early_at: int | None = None  # the epoch early stopping (``patience``) ended the run at
    placements: list[dict] = field(default_factory=list)  # each rank's node_id, gpu_ids, device (rank order)


def _pairs(d: dict, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    x_w, x_l = torch.as_tensor(d["x_w"]).float(), torch.as_tensor(d["x_l"]).float()
    if x_w.ndim != 2 or x_w.shape != x_l.shape or x_w.shape[0] == 0:
        raise ValueError(f"{what}: x_w and x_l must be non-empty [N, D] of equal shape, "
                         f"got {tuple(x_w.shape)} and {tuple(x_l.shape)}")
    return x_w, x_l


WHAT = "a reward-head run"
DONE_DIR = "done"  # a checkpoint's folder of the finished jobs' best heads (<job>/best)


def best_key(row: dict) -> tuple[float, float]:
    """What makes an epoch's head better (higher): val accuracy, then lower val loss."""
    return row["val_accuracy"], -row["val_loss"]


def _fit_job(job: dict, cfg: dict, device, rank: int, world: int, resume, done: dict, reports: int) -> int:
    """One job of the run's loop, from its first unfinished epoch; every epoch is one report, whose checkpoint
    holds this job's state and every finished job's best head (``done``). Returns the run's report count."""
    import ray
    import ray.train.torch

    data = {k: torch.tensor(np.asarray(v)).to(device) for k, v in ray.get(job["data_ref"]).items()}
    loss_fn, margin, name = get_loss(job["loss"]), cfg["margin"], job["name"]
    torch.manual_seed(job["seed"])
    head = RewardHead(job["in_dim"], cfg["hidden"])
    head.x_mean.copy_(torch.tensor(job["x_mean"]))
    head.x_std.copy_(torch.tensor(job["x_std"]))
    history: list[dict] = []
    best_state = None
    ckpt, state = resume or (None, None)
    if ckpt is not None:
        with ckpt.as_directory() as d:
            head.load_state_dict(load_head(Path(d) / "last").state_dict())
            best_state = head_state(load_head(Path(d) / "best"))
        history = state["history"]
    model = ray.train.torch.prepare_model(head, move_to_device=device)  # DDP when world > 1
    module = getattr(model, "module", model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if ckpt is not None:  # every DDP rank steps the full state: one share, rank 0's of a world of 1
        with ckpt.as_directory() as d:
            why = load_optimizer_state(opt, Path(d) / OPTIMIZER_DIR, rank=0, world=1, stage=0)
        if why is not None:
            print(f"[train_head {name}] rank {rank}: optimizer moments restart ({why})", flush=True)

    job["start_epoch"] = start_epoch = len(history) + 1
    n, per_bs = data["x_w"].shape[0], max(1, math.ceil(cfg["batch_size"] / world))
    best = EarlyStopping(cfg["patience"], best_key, history)
    last = cfg["epochs"] if cfg["stop_after_epoch"] is None else min(cfg["epochs"], cfg["stop_after_epoch"])
    tracker = Tracker(job["tracking"], rank)  # rank 0: each step's loss and each epoch's row (sparserm.tracking)
    for epoch in range(start_epoch, last + 1):
        if best.stop:
            break
        shard = epoch_order(n, job["seed"], epoch, rank, world, multiple=world).to(device)  # equal shards
        model.train()
        per_step = torch.zeros(math.ceil(shard.numel() / per_bs), 2, dtype=torch.float64, device=device)  # loss, pairs
        for i, b in enumerate(range(0, shard.numel(), per_bs)):
            idx = shard[b: b + per_bs]
            s = model(torch.cat([data["x_w"][idx], data["x_l"][idx]]))  # one forward per DDP step
            loss = loss_fn(s[: idx.numel()], s[idx.numel():], margin=margin)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            per_step[i] = torch.tensor([loss.item() * idx.numel(), idx.numel()], dtype=torch.float64, device=device)
        per_step = all_reduced(per_step, device, world)
        total = per_step.sum(0)
        module.eval()
        with torch.no_grad():
            v_w, v_l = module(data["v_w"]), module(data["v_l"])
            val_loss = float(loss_fn(v_w, v_l, margin=margin).item())
        row = {"epoch": epoch, "train_loss": float(total[0] / total[1]), "val_loss": val_loss,
               "val_accuracy": pair_accuracy(v_w.cpu(), v_l.cpu()),
               "step_loss": (per_step[:, 0] / per_step[:, 1]).tolist()}
        history.append(row)
        if best.update(row):
            best_state = head_state(module)
        if best.stop:
            row["stopped_early_at"] = epoch
        if cfg["progress"] and rank == 0:
            print(f"[train_head {name}] epoch {epoch}/{cfg['epochs']} train_loss={row['train_loss']:.4f} "
                  f"val_loss={val_loss:.4f} val_acc={row['val_accuracy']:.4f} (best {best.best_epoch})"
                  + (" stopped early" if best.stop else ""), flush=True)

        def write(folder: Path) -> None:
            if rank == 0:
                save_head(module, folder / "last")
                save_head(module, folder / "best", state=best_state)
                save_optimizer_state(opt, folder / OPTIMIZER_DIR, rank=0, world=1, stage=0)
                for other, finished in done.items():
                    save_head(finished["head"], folder / DONE_DIR / other / "best")

        reports += 1
        report_epoch(reports, {**row, "best_epoch": best.best_epoch},
                     {"job": name, "best_epoch": best.best_epoch, "history": history, "fingerprint": cfg["fingerprint"],
                      "done": {k: _done_info(v) for k, v in done.items()},
                      **({"stopped_early_at": epoch} if best.stop else {})}, rank=rank, write=write)
        tracker.log_epoch({**row, "best_epoch": best.best_epoch}, {"loss": row["step_loss"]},
                          first_step=(epoch - 1) * len(per_step) + 1)  # global steps: every epoch takes as many
    tracker.close()
    info = {"best_epoch": best.best_epoch, "history": history,
            **({"stopped_early_at": best.epoch} if best.stop else {})}
    done[name] = {**info, "head": _head_with(module, best_state or head_state(module))}
    return reports


def _head_with(module, state) -> RewardHead:
    head = RewardHead(module.in_dim, module.hidden, module.std_floor)
    head.load_state_dict(state)
    return head


def _done_info(finished: dict) -> dict:
    return {k: v for k, v in finished.items() if k != "head"}


def _train_loop(cfg: dict) -> dict:
    """Runs on every Ray Train worker: the run's jobs one after another, in one worker group; a resumed run skips
    the jobs its checkpoint holds as done and continues the one it reported last."""
    import ray.train
    import ray.train.torch

    quiet_worker_logs()

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Ray Train names cuda:0 for a worker holding a (logical) GPU even where there is no CUDA
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    placements = rank_placements(device, world)
    ckpt, state = resumed_checkpoint(cfg["fingerprint"], WHAT)
    done: dict[str, dict] = {}
    reports, current = 0, None
    if ckpt is not None:
        reports, current = int(state["epoch"]), state.get("job", cfg["jobs"][0]["name"])
        with ckpt.as_directory() as d:
            for other, info in state.get("done", {}).items():
                done[other] = {**info, "head": load_head(Path(d) / DONE_DIR / other / "best")}
    for job in cfg["jobs"]:
        if job["name"] in done:
            job["start_epoch"] = cfg["epochs"] + 1
            continue
        reports = _fit_job(job, cfg, device, rank, world, (ckpt, state) if job["name"] == current else None, done,
                           reports)
    return {"start_epoch": {j["name"]: j["start_epoch"] for j in cfg["jobs"]},  # rank 0's: ``Result.return_value``
            "placements": placements}


@dataclass(frozen=True)
class HeadJob:
    """One head of a :func:`train_heads` run: its pairs (``{"x_w": [N, D], "x_l": [N, D]}``), loss and seed."""
    name: str
    train: dict
    val: dict
    loss: str = "margin"
    seed: int = 0


def train_head(train: dict, val: dict, *, loss: str = "margin", seed: int = 0, name: str, **kwargs) -> TrainHeadResult:
    """One head (:func:`train_heads` with one job, the run named ``name``); the same keywords."""
    return train_heads([HeadJob(name, train, val, loss, seed)], name=name, **kwargs)[0]


def _job_fingerprint(job: HeadJob, x_w, x_l, n_val: int, settings: dict) -> dict:
    return {"in_dim": int(x_w.shape[1]), "hidden": settings["hidden"], "loss": job.loss, "margin": settings["margin"],
            "lr": settings["lr"], "weight_decay": settings["weight_decay"], "batch_size": settings["batch_size"],
            "seed": job.seed, "n_train": int(x_w.shape[0]), "n_val": int(n_val),
            "data_sum": float(f"{(x_w.double().sum() - 2 * x_l.double().sum()).item():.6g}")}


def run_fingerprint(names: list[str], fingerprints: list[dict]) -> dict:
    """A run of one job: that job's fingerprint; of several: their names, and each job's fields as ``name.field``
    (so a refusal names the job and the setting that changed)."""
    if len(names) == 1:
        return fingerprints[0]
    return {"jobs": list(names), **{f"{n}.{k}": v for n, fp in zip(names, fingerprints) for k, v in fp.items()}}


def train_heads(jobs: list[HeadJob], *, margin: float = 1.0, hidden: int = 512, epochs: int = 30, lr: float = 1e-3,
                weight_decay: float = 0.0, batch_size: int = 64, num_workers: int = 1, num_cpus: float = 1.0,
                num_gpus: float = 0.0, storage_dir: Path, name: str, progress: bool = True, max_failures: int = 0,
                stop_after_epoch: int | None = None, ray_address: str | None = None, poll_interval_s: float = 0.1,
                patience: int = 0, tracking=None) -> list[TrainHeadResult]:
    """Train a :class:`RewardHead` per job with Ray Train, all in one run ``storage_dir/name`` (one worker group,
    the jobs one after another: a sweep or an ablation pays Ray Train's start-up once, not once a head).

    ``batch_size`` is the global batch (each of ``num_workers`` DDP workers takes ``ceil(batch/W)``);
    ``num_cpus`` / ``num_gpus`` are per worker (GPU training when ``num_gpus > 0``).
    ``max_failures``: worker failures Ray Train recovers from, from the latest checkpoint (the stages pass
    ``run.max_failures``).
    ``stop_after_epoch`` (a run of one job): stop cleanly after that epoch, as an interrupted job would (a later
    call with the same ``storage_dir``/``name`` resumes); the result then has ``finished=False``.
    ``poll_interval_s``: Ray Train's controller polls workers at this interval, and every
    ``ray.train.report`` waits for a poll (Ray's default of 2 s would make a 30-epoch head take a
    minute); used unless ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` is set in the environment.
    ``patience`` > 0: stop once the best epoch has not improved for that many epochs (``stopped_early_at``;
    the result is then ``finished``); 0: train every epoch.
    ``tracking``: a ``TrackingConfig`` (the stage's ``cfg.tracking``); None: nothing logged. A run of one job logs
    into ``<storage_dir>/<name>/tensorboard``, of several into ``.../tensorboard/<job>``.
    Returns, per job in order, the head of its best epoch (val accuracy, ties → lower val loss; complete ties →
    earlier), and ``placements``: the node, GPU ids and device of each rank of this run, in rank order.
    """
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    names = [j.name for j in jobs]
    if not jobs or len(set(names)) != len(names) or DONE_DIR in names:
        raise ValueError(f"train_heads needs jobs of distinct names (and none named {DONE_DIR!r}), got {names}")
    if stop_after_epoch is not None and len(jobs) > 1:
        raise ValueError("stop_after_epoch stops a run of one job; this run has " f"{len(jobs)}")
    settings = {"hidden": hidden, "margin": margin, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size}
    specs, fingerprints = [], []
    for job in jobs:
        get_loss(job.loss)  # fail early on an unknown name
        x_w, x_l = _pairs(job.train, f"{job.name} train")
        v_w, v_l = _pairs(job.val, f"{job.name} val")
        if v_w.shape[1] != x_w.shape[1]:
            raise ValueError(f"{job.name}: train has {x_w.shape[1]} input columns, val has {v_w.shape[1]}")
        stats = RewardHead(x_w.shape[1], 1).fit_standardization(torch.cat([x_w, x_l]))
        fingerprints.append(_job_fingerprint(job, x_w, x_l, v_w.shape[0], settings))
        log_dir = Path(storage_dir, name, "tensorboard", *([job.name] if len(jobs) > 1 else []))
        specs.append({"name": job.name, "loss": job.loss, "seed": int(job.seed), "in_dim": int(x_w.shape[1]),
                      "x_mean": stats.x_mean.tolist(), "x_std": stats.x_std.tolist(),
                      "tracking": tracking_spec(tracking, log_dir, "reward_head", fingerprints[-1]),
                      "data": {"x_w": x_w.numpy(), "x_l": x_l.numpy(), "v_w": v_w.numpy(), "v_l": v_l.numpy()}})
    fingerprint = run_fingerprint(names, fingerprints)
    refuse_other_run(Path(storage_dir) / name, fingerprint, WHAT)
    ensure_ray(ray_address)
    for spec in specs:
        spec["data_ref"] = ray.put(spec.pop("data"))
    cfg = {"jobs": specs, "margin": float(margin), "hidden": int(hidden), "epochs": int(epochs), "lr": float(lr),
           "weight_decay": float(weight_decay), "batch_size": int(batch_size), "progress": bool(progress),
           "fingerprint": fingerprint, "stop_after_epoch": stop_after_epoch, "patience": int(patience)}
    use_gpu = num_gpus > 0
    trainer = TorchTrainer(
        _train_loop, train_loop_config=cfg,
        # nccl needs CUDA: a GPU reserved on a machine without it (a logical GPU) trains on CPU with gloo
        torch_config=TorchConfig(backend="nccl" if use_gpu and torch.cuda.is_available() else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={
            "CPU": num_cpus, **({"GPU": num_gpus} if use_gpu else {})}),
        run_config=run_config(storage_dir, name, max_failures),
    )
    result = fit_polling(trainer, poll_interval_s)
    ckpt_dir = final_checkpoint(result, storage_dir, name, "train_head")
    state = json.loads((ckpt_dir / "state.json").read_text())
    returned = result.return_value or {}
    started = returned.get("start_epoch", {})
    out = []
    for job in jobs:  # the job reported last is the checkpoint's own; the others are in its done/ folder
        current = job.name == state.get("job", names[0])
        folder, info = (ckpt_dir, state) if current else (ckpt_dir / DONE_DIR / job.name, state["done"][job.name])
        stopped = info.get("stopped_early_at")
        r = TrainHeadResult(head=load_head(folder / "best").eval(), best_epoch=int(info["best_epoch"]),
                            history=list(info["history"]), checkpoint_dir=folder,
                            finished=len(info["history"]) >= epochs or stopped is not None,
                            start_epoch=int(started.get(job.name, 1)), stopped_early_at=stopped,
                            placements=list(returned.get("placements", [])))
        out.append(r)
        if progress:  # the per-epoch lines come from the rank-0 worker (seen only with log_to_driver)
            best = r.history[r.best_epoch - 1]
            print(f"[train_head {job.name}] trained epochs {r.start_epoch}..{len(r.history)} of {epochs}"
                  + (" (stopped early)" if stopped else "") + f"; best epoch "
                  f"{r.best_epoch}: val_acc={best['val_accuracy']:.4f} val_loss={best['val_loss']:.4f}", flush=True)
    return out
