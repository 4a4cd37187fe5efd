"""Train the reward head with Ray Train (``TorchTrainer``; gloo on CPU, DDP via ``prepare_model``).

Each epoch every worker trains on its shard of the training pairs, then evaluates the whole (small)
validation set, and all workers call ``ray.train.report``; rank 0 attaches a checkpoint folder:

    epoch_NNNN/last/{head.safetensors,head.json}   weights after this epoch
    epoch_NNNN/best/{head.safetensors,head.json}   best weights so far (val accuracy, ties: lower val loss)
    epoch_NNNN/optimizer.safetensors               AdamW state tensors (param groups live in state.json)
    epoch_NNNN/state.json                          epoch, best_epoch, history, param groups, fingerprint

Only the latest checkpoint is kept (it carries the best head), so a run costs ~2 MB of storage.
Resume: a run with the same ``storage_dir``/``name`` finds Ray Train's run snapshot there, so
``ray.train.get_checkpoint()`` returns the last finished epoch; the workers reload head, optimizer state,
history and best head and continue at the next epoch. The shuffle of epoch e depends only on
(seed, e), so a resumed run repeats exactly what an uninterrupted one would do. A stored run whose
settings or data differ (``fingerprint``) is refused rather than silently continued.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sparserm.reward.accuracy import pair_accuracy
from sparserm.reward.head import RewardHead, head_state, load_head, save_head
from sparserm.reward.losses import get_loss

__all__ = ["TrainHeadResult", "train_head", "ensure_ray", "fit_polling", "failure_config"]


@dataclass
class TrainHeadResult:
    head: RewardHead  # weights of best_epoch, on CPU, eval mode
    best_epoch: int  # 1-based
    history: list[dict]  # one dict per finished epoch: epoch, train_loss, val_loss, val_accuracy
    checkpoint_dir: Path  # the run's latest checkpoint folder (its best/ holds ``head``)
    finished: bool = True  # False when stopped by ``stop_after_epoch`` before ``epochs``
    start_epoch: int = 1  # the first epoch this call trained (> 1 after a resume; epochs + 1: nothing left)


def ensure_ray(address: str | None = None) -> None:
    """Start (or join) Ray once per process."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False)


# Ray Train retries a worker group it cannot place (60 s each, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S) without
# end by default; after this many tries (~10 min) the run fails, naming the resources it waited for
PLACEMENT_RETRIES = 10


def failure_config(max_failures: int = 0):
    """Ray Train's ``FailureConfig``: ``max_failures`` worker-group failures, and a bounded wait for placement."""
    from ray.train import FailureConfig

    return FailureConfig(max_failures=max_failures, controller_failure_limit=PLACEMENT_RETRIES)


def fit_polling(trainer, poll_interval_s: float):
    """``trainer.fit()`` with Ray Train's controller polling workers every ``poll_interval_s`` (each
    ``ray.train.report`` waits for a poll; Ray's 2 s default dominates short epochs), unless
    ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` is set in the environment. Raises TrainingFailedError."""
    key = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # read by Ray from the driver's env at fit time
    preset = key in os.environ
    if not preset:
        os.environ[key] = str(poll_interval_s)
    try:
        return trainer.fit()
    finally:
        if not preset:
            os.environ.pop(key, None)


def _pairs(d: dict, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    x_w, x_l = torch.as_tensor(d["x_w"]).float(), torch.as_tensor(d["x_l"]).float()
    if x_w.ndim != 2 or x_w.shape != x_l.shape or x_w.shape[0] == 0:
        raise ValueError(f"{what}: x_w and x_l must be non-empty [N, D] of equal shape, "
                         f"got {tuple(x_w.shape)} and {tuple(x_l.shape)}")
    return x_w, x_l


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = opt.state_dict()
    tensors = {f"state.{pid}.{k}": torch.as_tensor(v).detach().cpu().contiguous().clone()
               for pid, st in sd["state"].items() for k, v in st.items()}
    return tensors, sd["param_groups"]


def _optimizer_state(tensors: dict[str, torch.Tensor], param_groups: list) -> dict:
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = t
    return {"state": state, "param_groups": param_groups}


def _stored_fingerprint(run_dir: Path) -> dict | None:
    """Fingerprint in the newest ``epoch_*/state.json`` of an earlier run in ``run_dir`` (None: no run)."""
    for p in sorted(run_dir.glob("epoch_*/state.json"), key=lambda q: q.parent.name, reverse=True):
        try:
            return json.loads(p.read_text())["fingerprint"]
        except (OSError, ValueError, KeyError):
            continue
    return None


def _train_loop(cfg: dict) -> dict:
    """Runs on every Ray Train worker."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Ray Train names cuda:0 for a worker holding a (logical) GPU even where there is no CUDA
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    data = {k: torch.tensor(np.asarray(v)).to(device) for k, v in ray.get(cfg["data_ref"]).items()}
    loss_fn, margin = get_loss(cfg["loss"]), cfg["margin"]

    torch.manual_seed(cfg["seed"])
    head = RewardHead(cfg["in_dim"], cfg["hidden"])
    head.x_mean.copy_(torch.tensor(cfg["x_mean"]))
    head.x_std.copy_(torch.tensor(cfg["x_std"]))
    history: list[dict] = []
    best_epoch, best_state, opt_state = 0, None, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            d = Path(d)
            state = json.loads((d / "state.json").read_text())
            if state["fingerprint"] != cfg["fingerprint"]:
                raise ValueError(f"the stored run {cfg['name']!r} was trained with other settings or data "
                                 f"({state['fingerprint']} vs {cfg['fingerprint']}); use a new name")
            head.load_state_dict(load_head(d / "last").state_dict())
            best_state = head_state(load_head(d / "best"))
            opt_state = _optimizer_state(load_file(str(d / "optimizer.safetensors")), state["param_groups"])
            history, best_epoch = state["history"], state["best_epoch"]
    model = ray.train.torch.prepare_model(head, move_to_device=device)  # DDP when world > 1
    module = getattr(model, "module", model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if opt_state is not None:
        opt.load_state_dict(opt_state)

    start_epoch = len(history) + 1
    n, per_bs = data["x_w"].shape[0], max(1, math.ceil(cfg["batch_size"] / world))
    best_key = ((history[best_epoch - 1]["val_accuracy"], -history[best_epoch - 1]["val_loss"])
                if best_epoch else None)
    last = cfg["epochs"] if cfg["stop_after_epoch"] is None else min(cfg["epochs"], cfg["stop_after_epoch"])
    for epoch in range(start_epoch, last + 1):
        g = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + epoch)  # same on every worker
        perm = torch.randperm(n, generator=g)
        perm = torch.cat([perm, perm[: (-n) % world]])  # pad so every shard has the same length
        shard = perm[rank::world].to(device)
        model.train()
        total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, pair count
        for b in range(0, shard.numel(), per_bs):
            idx = shard[b: b + per_bs]
            s = model(torch.cat([data["x_w"][idx], data["x_l"][idx]]))  # one forward per DDP step
            loss = loss_fn(s[: idx.numel()], s[idx.numel():], margin=margin)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += torch.tensor([loss.item() * idx.numel(), idx.numel()], dtype=torch.float64, device=device)
        if world > 1 and dist.is_initialized():
            dist.all_reduce(total)
        module.eval()
        with torch.no_grad():
            v_w, v_l = module(data["v_w"]), module(data["v_l"])
            val_loss = float(loss_fn(v_w, v_l, margin=margin).item())
        row = {"epoch": epoch, "train_loss": float(total[0] / total[1]), "val_loss": val_loss,
               "val_accuracy": pair_accuracy(v_w.cpu(), v_l.cpu())}
        history.append(row)
        if best_key is None or (row["val_accuracy"], -val_loss) > best_key:
            best_key, best_epoch, best_state = (row["val_accuracy"], -val_loss), epoch, head_state(module)
        if cfg["progress"] and rank == 0:
            print(f"[train_head {cfg['name']}] epoch {epoch}/{cfg['epochs']} train_loss={row['train_loss']:.4f} "
                  f"val_loss={val_loss:.4f} val_acc={row['val_accuracy']:.4f} (best {best_epoch})", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                tmp_p = Path(tmp)
                save_head(module, tmp_p / "last")
                save_head(module, tmp_p / "best", state=best_state)
                tensors, groups = _optimizer_tensors(opt)
                save_file(tensors, str(tmp_p / "optimizer.safetensors"))
                (tmp_p / "state.json").write_text(json.dumps(
                    {"epoch": epoch, "best_epoch": best_epoch, "history": history, "param_groups": groups,
                     "fingerprint": cfg["fingerprint"]}, indent=1))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**row, "best_epoch": best_epoch}, checkpoint=checkpoint,
                             checkpoint_dir_name=f"epoch_{epoch:04d}")
    return {"start_epoch": start_epoch}  # rank 0's value becomes ``Result.return_value``


def train_head(train: dict, val: dict, *, loss: str = "margin", margin: float = 1.0, hidden: int = 512,
               epochs: int = 30, lr: float = 1e-3, weight_decay: float = 0.0, batch_size: int = 64,
               num_workers: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0, seed: int = 0,
               storage_dir: Path, name: str, progress: bool = True, max_failures: int = 0,
               stop_after_epoch: int | None = None, ray_address: str | None = None,
               poll_interval_s: float = 0.1) -> TrainHeadResult:
    """Train a :class:`RewardHead` on pairs ``{"x_w": [N, D], "x_l": [N, D]}`` with Ray Train.

    ``batch_size`` is the global batch (each of ``num_workers`` DDP workers takes ``ceil(batch/W)``);
    ``num_cpus`` / ``num_gpus`` are per worker (GPU training when ``num_gpus > 0``).
    ``max_failures``: worker failures Ray Train recovers from (from the latest checkpoint).
    ``stop_after_epoch``: stop cleanly after that epoch, as an interrupted job would (a later call with
    the same ``storage_dir``/``name`` resumes); the result then has ``finished=False``.
    ``poll_interval_s``: Ray Train's controller polls workers at this interval, and every
    ``ray.train.report`` waits for a poll (Ray's default of 2 s would make a 30-epoch head take a
    minute); used unless ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` is set in the environment.
    Returns the head of the best epoch (val accuracy, ties → lower val loss; complete ties → earlier).
    """
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    get_loss(loss)  # fail early on an unknown name
    x_w, x_l = _pairs(train, "train")
    v_w, v_l = _pairs(val, "val")
    if v_w.shape[1] != x_w.shape[1]:
        raise ValueError(f"train has {x_w.shape[1]} input columns, val has {v_w.shape[1]}")
    stats = RewardHead(x_w.shape[1], 1).fit_standardization(torch.cat([x_w, x_l]))
    fingerprint = {"in_dim": int(x_w.shape[1]), "hidden": hidden, "loss": loss, "margin": margin, "lr": lr,
                   "weight_decay": weight_decay, "batch_size": batch_size, "seed": seed,
                   "n_train": int(x_w.shape[0]), "n_val": int(v_w.shape[0]),
                   "data_sum": float(f"{(x_w.double().sum() - 2 * x_l.double().sum()).item():.6g}")}
    stored = _stored_fingerprint(Path(storage_dir) / name)
    if stored is not None and stored != fingerprint:
        changed = sorted(k for k in fingerprint if stored.get(k) != fingerprint[k])
        raise ValueError(f"{Path(storage_dir) / name} holds a run with other settings or data (differs in "
                         f"{', '.join(changed)}); resume it unchanged, or use a new name")
    ensure_ray(ray_address)
    data_ref = ray.put({"x_w": x_w.numpy(), "x_l": x_l.numpy(), "v_w": v_w.numpy(), "v_l": v_l.numpy()})
    cfg = {"data_ref": data_ref, "loss": loss, "margin": float(margin), "hidden": int(hidden),
           "in_dim": int(x_w.shape[1]), "epochs": int(epochs), "lr": float(lr), "weight_decay": float(weight_decay),
           "batch_size": int(batch_size), "seed": int(seed), "name": name, "progress": bool(progress),
           "x_mean": stats.x_mean.tolist(), "x_std": stats.x_std.tolist(), "fingerprint": fingerprint,
           "stop_after_epoch": stop_after_epoch}
    use_gpu = num_gpus > 0
    trainer = TorchTrainer(
        _train_loop, train_loop_config=cfg,
        # nccl needs CUDA: a GPU reserved on a machine without it (a logical GPU) trains on CPU with gloo
        torch_config=TorchConfig(backend="nccl" if use_gpu and torch.cuda.is_available() else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={
            "CPU": num_cpus, **({"GPU": num_gpus} if use_gpu else {})}),
        run_config=RunConfig(storage_path=str(Path(storage_dir).resolve()), name=name,
                             failure_config=failure_config(max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    result = fit_polling(trainer, poll_interval_s)
    if result.checkpoint is None:
        raise RuntimeError(f"train_head {name!r}: no epoch finished, so there is no checkpoint")
    ckpt_dir = Path(result.checkpoint.path)
    state = json.loads((ckpt_dir / "state.json").read_text())
    out = TrainHeadResult(head=load_head(ckpt_dir / "best").eval(), best_epoch=int(state["best_epoch"]),
                          history=list(state["history"]), checkpoint_dir=ckpt_dir,
                          finished=int(state["epoch"]) >= epochs,
                          start_epoch=int((result.return_value or {}).get("start_epoch", 1)))
    if progress:  # the per-epoch lines come from the rank-0 worker (seen only with log_to_driver)
        best = out.history[out.best_epoch - 1]
        print(f"[train_head {name}] trained epochs {out.start_epoch}..{state['epoch']} of {epochs}; best epoch "
              f"{out.best_epoch}: val_acc={best['val_accuracy']:.4f} val_loss={best['val_loss']:.4f}", flush=True)
    return out
