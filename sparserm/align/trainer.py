"""Preference training with LoRA under DeepSpeed, on Ray Train (``TorchTrainer``: NCCL on GPUs, gloo on CPU),
for any objective of ``sparserm.align.objectives`` (``align.loss.name``: dpo, simpo, ...).

Each worker loads the base model once, adds (or continues) the LoRA adapter with peft and hands the model
with an AdamW over the adapter's parameters, and the warm-up schedule of ``sparserm.align.schedule``
(``align.train.warmup_steps``, then constant), to ``deepspeed.initialize`` (ZeRO stage from config; bf16 on
CUDA, fp32 on CPU unless ``align.train.precision`` says otherwise).

The loop never names an objective: it asks the objective what it needs from the reference model
(``reference``: none | sequence | token | features, built by ``sparserm.align.references.REFERENCE_SOURCES``
after ``deepspeed.initialize``, so reference and policy share dtype and weights) and from the policy forward
(``policy_needs``: per-token distributions, pooled SAE features; ``sparserm.align.pair_forward``), runs one
policy forward per micro-batch and calls ``objective.loss``. A ``"features"`` reference comes from the offline
reference cache, which the driver builds (or finds, keyed) with one Ray Data pass before training, so no
reference model exists on the workers. The first epoch's row records ``u_abs_max_before_first_step``,
``reference_kind``, ``reference_forwards`` (before training), ``reference_forwards_in_steps``,
``reference_copy`` (a second frozen model), ``model_forwards_in_steps`` against ``policy_micro_batches``
(equal when no adapter-disabled reference forward ran during the steps), and ``placement`` (this rank's node,
GPU ids and device) with ``placements`` (every rank's, in rank order). Sequence stats are stored in the
checkpoint. Every epoch rank 0 writes:

    adapter/                  peft adapter (adapter_model.safetensors + adapter_config.json)
    reference.safetensors     the reference stats of every pair (for an objective that has a reference)
    state.json                epoch, per-epoch history (loss, accuracy; each step's lr, step_loss and
                              step_reward_accuracy; global step), fingerprint
    optimizer/rank_<r>.*      each rank's optimizer moments (``optimizer_state``; written by every rank)
    best/                     with early stopping: the weights of the best epoch so far (as ``adapter/``)

A rerun with the same ``storage_dir``/``name`` resumes after the last finished epoch (Ray Train's run
snapshot) with the adapter and the optimizer moments of that epoch, and the lr schedule at the global step it
stopped at. The shuffle of epoch e depends only on (seed, e), so a resumed run follows the same steps as an
unbroken one; so does a run whose worker died mid-epoch, which Ray Train restarts from the last checkpoint
(``run.max_failures`` times). The run's fingerprint covers what changes training (pairs, ``align.train``, the
objective's ``key`` of ``align.loss``, ``align.reference``, the model, the starting adapter's content, the token
budget, the seed), so an evaluation or generation setting never blocks a resume (fingerprint checks, epoch order and
checkpoint writing: ``sparserm.train_state``, shared with the reward head's loop).

``align.train.val_fraction`` > 0 holds that share of the pairs (drawn by the seed) out of the steps; after each
epoch the workers compute ``objective.loss`` on them with the same reference (a once-computed or cached one
covers every pair passed in): the row's ``val_loss``, ``val_reward_accuracy``. ``align.train.patience`` > 0
stops once val loss has not improved for that many epochs (``stopped_early_at``) and returns the best epoch's
weights and ``best_epoch``.

Tracking (``sparserm.tracking``): after each epoch's checkpoint rank 0 logs its steps (``step/loss``,
``step/reward_accuracy``, ``step/lr``) and its row (``epoch/<key>``) at global steps to
``<storage_dir>/<name>/tensorboard/`` (and MLflow when ``tracking.mlflow_uri`` is set).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from sparserm.align.objectives import get_objective
from sparserm.align.pair_forward import pair_forward, tokenize_pairs, unwrap_causal_lm, use_full_logits
from sparserm.align.validation import validate
from sparserm.config import AlignConfig, Config, TrainConfig, to_dict
from sparserm.manifest import model_key, stable_hash
from sparserm.tracking import Tracker, tracking_spec
from sparserm.train_state import (OPTIMIZER_DIR, EarlyStopping, all_reduced, epoch_order, held_out, peak_rss_mb,
                                  rank_placements, refuse_other_run, report_epoch, resumed_checkpoint, rss_mb)

__all__ = ["train_dpo", "ds_config", "adapter_hash", "dpo_key"]


def use_bf16(t: TrainConfig, device) -> bool:
    """``auto``: bf16 on CUDA, fp32 elsewhere."""
    return t.precision == "bf16" or (t.precision == "auto" and torch.device(device).type == "cuda")


def ds_config(t: TrainConfig, world: int, bf16: bool) -> dict:
    micro = t.micro_batch_size
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": max(1, t.batch_size // (micro * world)),
        "zero_optimization": {"stage": t.deepspeed_stage},
        "gradient_clipping": 1.0,
        "bf16": {"enabled": bool(bf16)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def adapter_hash(folder: str | None) -> str | None:
    """Content hash of a saved LoRA adapter (its weights and config), so a key names what it was, not where."""
    if folder is None:
        return None
    from sparserm.manifest import file_sha256

    return stable_hash([file_sha256(Path(folder, f)) for f in ("adapter_model.safetensors", "adapter_config.json")])


# where and how a run executes, not what it computes (num_workers stays: each worker's optimizer share is saved
# per rank)
PLACEMENT_FIELDS = ("num_cpus", "num_gpus", "backend", "torch_threads", "gradient_checkpointing")
# fields added after runs were keyed: at these values they compute what the runs before them did, and stay out
UNSET_WHEN = {"warmup_steps": 0, "finetune": "lora", "reference_online": False, "val_fraction": 0.0, "patience": 0}


def dpo_key(cfg: Config, pairs: list[dict], init_adapter: str | None) -> dict:
    """What a DPO run's result depends on: the pairs, the training and loss settings, the reference, the model's
    identity, the starting adapter's content, the token budget and the seed (not placement, not evaluation)."""
    a = cfg.align
    return {"pairs": stable_hash([[p["prompt"], p["chosen"], p["rejected"]] for p in pairs]),
            "train": {k: v for k, v in to_dict(a.train).items()
                      if k not in PLACEMENT_FIELDS and not (k in UNSET_WHEN and v == UNSET_WHEN[k])},
            "loss": get_objective(a.loss.name).key(a.loss), "reference": a.reference, "model": model_key(cfg.model),
            "init": adapter_hash(init_adapter), "seed": cfg.run.seed,
            "max_tokens": a.generate.max_prompt_tokens + a.generate.max_new_tokens, **_features_key(a.loss)}


def _features_key(loss_cfg) -> dict:
    """The SAE and layer of a feature-level objective (absent for the others, so their keys stay as they were)."""
    from sparserm.align.references import feature_source, uses_features
    from sparserm.manifest import folder_hash

    if not uses_features(get_objective(loss_cfg.name)):
        return {}
    sae_dir, layer = feature_source(loss_cfg)
    return {"features": {"sae": folder_hash(sae_dir), "layer": layer}}


def frozen_checksum(model) -> float:
    """Sum of every frozen (base) parameter: must not move during LoRA training."""
    return float(sum(p.detach().double().sum().item() for p in model.parameters() if not p.requires_grad))


def _without_shm_comm() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce op (``deepspeed_shm_comm``) on CPU:
    only its inference all-reduce uses it, never training, and it is built with ``-march=native`` into
    ``~/.cache/torch_extensions``, a minute of compiling on every fresh machine and an illegal instruction
    on a CPU other than the one that built it. ``deepspeed.ops.__compatible_ops__`` is the one dict DeepSpeed
    consults (it says edits to it persist)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


WHAT = "a DPO run"


def _train_loop(c: dict) -> dict:
    """Runs on every Ray Train worker."""
    from sparserm.ray_train import quiet_worker_logs

    quiet_worker_logs()  # before DeepSpeed's import
    import deepspeed
    import ray
    import ray.train
    import ray.train.torch
    from safetensors.torch import load_file, save_file

    from sparserm.align.finetune import FINETUNE
    from sparserm.align.optimizer_state import load_optimizer_state, save_optimizer_state, stepped_params
    from sparserm.align.references import ReferenceContext, reference_source
    from sparserm.align.schedule import warmup_scheduler
    from sparserm.config import ModelConfig, build
    from sparserm.model.backbone import load_causal_lm

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    os.environ.setdefault("LOCAL_RANK", str(ctx.get_local_rank()))  # DeepSpeed reads it
    if c["threads"]:
        torch.set_num_threads(c["threads"])
    # Ray Train names cuda:0 for a worker that holds a GPU share even where CUDA is absent (a logical GPU)
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    placements = rank_placements(device, world)  # node, GPUs and device of every rank, in rank order
    a = build(AlignConfig, c["align"])
    t = a.train
    mcfg = build(ModelConfig, c["model"])
    weights = FINETUNE[t.finetune]
    tracker = Tracker(c["tracking"], rank)  # rank 0: each step's loss, accuracy, lr; each epoch's row (global steps)
    rss_before_model = rss_mb()  # the worker's baseline (with the tracker's libraries): peak memory is above it
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, tok = load_causal_lm(mcfg, c["cache_dir"], device)
    model = weights.prepare(model, t, c["init_adapter"], c["seed"])
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base_sum = frozen_checksum(model)
    pairs = ray.get(c["pairs_ref"])
    seqs = tokenize_pairs(tok, pairs, c["max_tokens"], mcfg.chat_template)
    micro = t.micro_batch_size
    train_idx, val_idx = held_out(len(seqs), t.val_fraction, c["seed"])  # the reference covers both
    if t.val_fraction and not val_idx and rank == 0:
        print(f"[dpo {c['name']}] 1 pair: nothing to hold out for validation; it trains on it", flush=True)

    objective = c["objective"]  # resolved by the driver (an objective registered at run time arrives pickled)
    sae = None
    if "features" in objective.policy_needs:  # frozen: the constraint's gradient reaches the model only
        from sparserm.sae.autoencoder import SparseAutoencoder

        sae = SparseAutoencoder.load(c["features"]["sae_dir"], device)
        for p in sae.sae.parameters():
            p.requires_grad_(False)
    history, stored_ref = [], None
    keep = tempfile.TemporaryDirectory() if t.patience and rank == 0 else None  # <keep>/best: the best weights
    ckpt, state = resumed_checkpoint(c["fingerprint"], WHAT)
    if ckpt is not None:
        with ckpt.as_directory() as d:
            weights.restore(model, Path(d) / weights.folder)
            history = state["history"]
            if (Path(d) / "reference.safetensors").is_file():  # the reference stats stored with it
                stored_ref = load_file(str(Path(d) / "reference.safetensors"))
            if keep is not None:
                shutil.copytree(Path(d) / "best", Path(keep.name) / "best")
    global_step = history[-1].get("global_step", 0) if history else 0  # optimizer steps already taken

    trainable = [p for p in model.parameters() if p.requires_grad]
    _without_shm_comm()
    optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(t, world, use_bf16(t, device)),
                                      lr_scheduler=warmup_scheduler(t.warmup_steps, global_step))
    # one worker without ZeRO: the gradient all-reduce is the identity, and DeepSpeed's flattens every gradient
    # into a bucket first (measured: ~0.6 W of peak memory in each backward); ZeRO-1/2 take gradients through it
    engine.enable_backward_allreduce = world > 1 or t.deepspeed_stage > 0
    if t.deepspeed_stage == 3:
        use_full_logits(engine)
    # the reference, by the kind the objective declares (after initialize: the dtype and weights it trains in)
    ref = reference_source(objective.reference, t.reference_online)(ReferenceContext(
        engine, seqs, rank, world, micro, tok.pad_token_id, device, c["reference"], c["init_adapter"], c["model"],
        c["cache_dir"], stored_ref, weights, c["features"].get("cache"), c["features"].get("cache_key")))
    if ckpt is not None:
        with ckpt.as_directory() as d:
            with stepped_params(engine.optimizer):
                why = load_optimizer_state(engine.basic_optimizer, Path(d) / OPTIMIZER_DIR, rank=rank, world=world,
                                           stage=t.deepspeed_stage)
        if why is not None:
            print(f"[dpo {c['name']}] rank {rank}: optimizer moments restart ({why})", flush=True)
    beta = objective.beta_of(a.loss)
    u_first = None  # |u| before any optimizer step of this run (0 when the reference matches the policy)
    calls = [0]  # forwards of the trained model's weights during the steps (policy and any adapter-off reference)
    unwrap_causal_lm(engine).register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    micro_batches = 0
    # by val loss; a single pair, not split, has none: its latest epoch is the best
    stopper = EarlyStopping(t.patience, (lambda row: -row["val_loss"]) if val_idx else (lambda row: row["epoch"]),
                            history)

    def forward_loss(idx: list[int]):
        policy = pair_forward(engine, seqs, idx, tok.pad_token_id, device, objective.policy_needs, sae,
                              c["features"].get("layer"))
        return objective.loss(policy, ref.for_batch(idx, policy.stats.chosen.dtype), a.loss)

    for epoch in range(len(history) + 1, c["epochs"] + 1):
        if stopper.stop:
            break
        # whole steps on every worker: padded to a multiple of the pairs of one optimizer step over all workers
        order = epoch_order(len(train_idx), c["seed"], epoch, rank, world, multiple=t.batch_size)
        shard = [train_idx[i] for i in order.tolist()]
        engine.train()
        t_epoch, cpu_epoch = time.perf_counter(), time.process_time()
        n_micro, accumulation = math.ceil(len(shard) / micro), engine.gradient_accumulation_steps()
        per_step = torch.zeros(n_micro // accumulation, 4, dtype=torch.float64)  # loss, correct, margin, count
        lrs = []  # the rate of each optimizer step of this epoch
        for k, b in enumerate(range(0, len(shard), micro)):
            idx = shard[b: b + micro]
            losses, u = forward_loss(idx)
            micro_batches += 1
            if u_first is None and not history:
                u_first = float(u.abs().max())
            engine.backward(losses.mean())
            if engine.is_gradient_accumulation_boundary():
                lrs.append(float(engine.get_lr()[0]))
            engine.step()
            per_step[k // accumulation] += torch.tensor([losses.sum().item(), (u > 0).sum().item(), u.sum().item(),
                                                         len(idx)], dtype=torch.float64)
            if c["progress"] and rank == 0 and (k + 1) % c["log_every"] == 0:
                sums = per_step.sum(0)
                print(f"[dpo {c['name']}] epoch {epoch}/{c['epochs']} step {k + 1}/{n_micro} "
                      f"loss={sums[0] / sums[3]:.4f} acc={sums[1] / sums[3]:.3f}", flush=True)
        per_step = all_reduced(per_step, device, world)
        sums = per_step.sum(0)
        row = {"epoch": epoch, "loss": float(sums[0] / sums[3]), "reward_accuracy": float(sums[1] / sums[3]),
               "reward_margin": float(sums[2] / sums[3] / beta), "n_pairs": len(train_idx), "base_checksum": base_sum,
               "base_checksum_after": frozen_checksum(engine.module) if t.deepspeed_stage < 3 else None,
               "lr": lrs, "global_step": global_step + len(lrs),
               "step_loss": (per_step[:, 0] / per_step[:, 3]).tolist(),
               "step_reward_accuracy": (per_step[:, 1] / per_step[:, 3]).tolist(),
               "seconds_per_step": (time.perf_counter() - t_epoch) / max(1, len(lrs)),
               "cpu_seconds_per_step": (time.process_time() - cpu_epoch) / max(1, len(lrs)),  # all its threads
               "peak_rss_mb_above_baseline": peak_rss_mb() - rss_before_model,
               "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}
        global_step += len(lrs)
        if epoch == 1 and u_first is not None:
            row.update(u_abs_max_before_first_step=u_first, dtype=str(next(engine.module.parameters()).dtype),
                       objective=objective.name, reference_kind=objective.reference,
                       reference_forwards=ref.forwards, reference_forwards_in_steps=ref.forwards_in_steps,
                       reference_copy=getattr(ref, "copy", None) is not None,
                       model_forwards_in_steps=calls[0], policy_micro_batches=micro_batches,
                       placement=placements[rank], placements=placements)
        if val_idx:  # after the step counts above: these forwards are not the steps'
            row.update(validate(forward_loss, engine, val_idx, rank, world, micro, device))
        improved = stopper.update(row)
        if stopper.stop:
            row["stopped_early_at"] = epoch
        history.append(row)

        def write(folder: Path) -> None:  # on every rank: all ranks' files land in the same checkpoint folder
            weights.save(engine, t.deepspeed_stage, folder / weights.folder, tok, rank)
            with stepped_params(engine.optimizer):
                save_optimizer_state(engine.basic_optimizer, folder / OPTIMIZER_DIR, rank=rank, world=world,
                                     stage=t.deepspeed_stage)
            if rank == 0 and ref.to_save() is not None:
                save_file(ref.to_save(), str(folder / "reference.safetensors"))
            if keep is not None:  # rank 0: the best epoch's weights travel in every checkpoint
                if improved:
                    shutil.rmtree(Path(keep.name) / "best", ignore_errors=True)
                    shutil.copytree(folder / weights.folder, Path(keep.name) / "best")
                shutil.copytree(Path(keep.name) / "best", folder / "best")

        if c["progress"] and rank == 0:
            shown = {k: round(row[k], 4) for k in ("loss", "reward_accuracy", "reward_margin", "val_loss",
                                                    "val_reward_accuracy", "seconds_per_step") if k in row}
            print(f"[dpo {c['name']}] epoch {epoch}/{c['epochs']} done: " + json.dumps(shown), flush=True)
        report_epoch(epoch, row, {"history": history, "fingerprint": c["fingerprint"],
                                  **({"best_epoch": stopper.best_epoch} if t.patience else {})},
                     rank=rank, write=write, every_rank=True)
        tracker.log_epoch(row, {"loss": row["step_loss"], "reward_accuracy": row["step_reward_accuracy"], "lr": lrs},
                          first_step=global_step - len(lrs) + 1)
        if c["stop_after_epoch"] is not None and epoch >= c["stop_after_epoch"]:
            break
    tracker.close()
    return {"history": history}


def train_dpo(cfg: Config, pairs: list[dict], *, storage_dir: Path, name: str, init_adapter: str | None = None,
              stop_after_epoch: int | None = None, progress: bool = True) -> dict:
    """DPO-train a LoRA adapter on ``pairs`` (dicts with prompt/chosen/rejected). Returns
    ``{"adapter": <folder>, "model": <folder>, "history": [...], "finished": bool, "best_epoch": int | None}``,
    the last epoch's weights, or with early stopping (``align.train.patience``) the best epoch's (``best_epoch``;
    otherwise None): LoRA: the adapter folder (both keys); full fine-tuning: a model folder (``adapter`` None).
    ``finished``: every epoch ran, or early stopping ended the run."""
    from ray.train import ScalingConfig
    import ray
    from ray.train.torch import TorchConfig, TorchTrainer

    from sparserm.ray_train import ensure_ray, final_checkpoint, fit_polling, run_config

    a = cfg.align
    t = a.train
    objective = get_objective(a.loss.name)
    if not pairs:
        raise ValueError(f"{name}: no pairs to train on")
    from sparserm.align.finetune import FINETUNE
    from sparserm.align.references import feature_inputs

    FINETUNE[t.finetune].check_init(init_adapter)
    if t.patience and not t.val_fraction:
        raise ValueError(f"{name}: align.train.patience stops on val loss: it needs align.train.val_fraction > 0")
    held_out(len(pairs), t.val_fraction, cfg.run.seed)  # refuses a share that leaves nothing to train on
    ensure_ray(cfg.run.ray_address)
    max_tokens = a.generate.max_prompt_tokens + a.generate.max_new_tokens
    fingerprint = stable_hash(dpo_key(cfg, pairs, init_adapter))
    refuse_other_run(Path(storage_dir, name), fingerprint, WHAT)
    use_gpu = t.num_gpus > 0
    features = feature_inputs(cfg, objective, pairs, Path(storage_dir, name), init_adapter, progress)
    c = {"features": features, "align": to_dict(a), "model": to_dict(cfg.model), "cache_dir": cfg.run.cache_dir,
         "objective": objective,  # the object, not its name: one registered at run time reaches the workers
         "pairs_ref": ray.put([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]),
         "init_adapter": init_adapter, "reference": a.reference, "seed": cfg.run.seed, "epochs": t.epochs,
         "name": name, "max_tokens": max_tokens, "fingerprint": fingerprint, "stop_after_epoch": stop_after_epoch,
         "progress": progress, "log_every": max(1, 8 // max(1, t.micro_batch_size)) * 4,
         "threads": t.torch_threads or (os.cpu_count() if not use_gpu else 0),
         "tracking": tracking_spec(cfg.tracking, Path(storage_dir, name, "tensorboard"), f"dpo:{a.loss.name}",
                                   {"fingerprint": fingerprint})}
    resources = {"CPU": t.num_cpus, **({"GPU": t.num_gpus} if use_gpu else {})}
    trainer = TorchTrainer(
        _train_loop, train_loop_config=c,
        torch_config=TorchConfig(backend=None if t.backend == "auto" else t.backend),  # auto: nccl with GPUs
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=run_config(storage_dir, name, cfg.run.max_failures),
    )
    result = fit_polling(trainer, 0.2)
    ckpt = final_checkpoint(result, storage_dir, name, "dpo")
    state = json.loads((ckpt / "state.json").read_text())
    folder = ckpt / ("best" if t.patience else FINETUNE[t.finetune].folder)  # LoRA: an adapter; full: a model
    return {"adapter": str(folder) if t.finetune == "lora" else None, "model": str(folder), "history": state["history"],
            "finished": int(state["epoch"]) >= t.epochs or "stopped_early_at" in state["history"][-1],
            "best_epoch": state.get("best_epoch")}
