"""What the two Ray Train loops share: the reward head's (``sparserm.reward.train_head``) and preference
training's (``sparserm.align.trainer``).

A run lives in ``<storage_dir>/<name>/``; Ray Train keeps its latest epoch checkpoint there,
``epoch_NNNN/`` with a ``state.json`` (epoch, history, the run's fingerprint and what each loop adds) beside
the loop's own files. This module holds, once for both loops:

- the refusal of a stored run with another fingerprint: on the driver before any work
  (:func:`refuse_other_run`) and in the worker on the checkpoint it resumes (:func:`resumed_checkpoint`),
  both through :func:`check_fingerprint`, whose message names the run folder;
- the order of an epoch (:func:`epoch_order`): a permutation that depends only on (seed, epoch), padded to a
  whole multiple and sharded by rank, so a resumed run takes the steps an unbroken one takes; and the sum of
  an epoch's tallies over the workers (:func:`all_reduced`);
- writing an epoch checkpoint (:func:`report_epoch`) and the optimizer moments' folder in it
  (:data:`OPTIMIZER_DIR`, per-rank safetensors + JSON by ``sparserm.align.optimizer_state``);
- early stopping on validation (:class:`EarlyStopping`), and the held-out share of a pair set
  (:func:`held_out`);
- where each worker ran (:func:`placement_info`, every rank's: :func:`rank_placements`), which both loops
  report, so a multi-node run says from its own work which nodes trained.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

__all__ = ["STATE_FILE", "OPTIMIZER_DIR", "stored_fingerprint", "check_fingerprint", "refuse_other_run",
           "resumed_checkpoint", "epoch_order", "all_reduced", "report_epoch", "EarlyStopping", "held_out",
           "placement_info", "rank_placements"]

STATE_FILE = "state.json"
OPTIMIZER_DIR = "optimizer"  # optimizer/rank_<r>.{safetensors,json}: sparserm.align.optimizer_state


def stored_fingerprint(run_dir: Path) -> Any | None:
    """The fingerprint in the newest readable ``epoch_*/state.json`` of ``run_dir`` (None: no stored run)."""
    for p in sorted(Path(run_dir).glob(f"epoch_*/{STATE_FILE}"), key=lambda q: q.parent.name, reverse=True):
        try:
            return json.loads(p.read_text())["fingerprint"]
        except (OSError, ValueError, KeyError):
            continue
    return None


def check_fingerprint(stored: Any | None, fingerprint: Any, run_dir: Path | str, what: str) -> None:
    """Refuses (ValueError naming ``run_dir``) a stored run whose fingerprint is not ``fingerprint``; a dict
    fingerprint names the fields that differ. ``stored`` None: nothing stored, nothing to refuse."""
    if stored is None or stored == fingerprint:
        return
    detail = ""
    if isinstance(stored, dict) and isinstance(fingerprint, dict):
        changed = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
        detail = f" (other settings: {', '.join(changed)})"
    raise ValueError(f"{run_dir} holds {what} on other pairs or settings{detail}; resume it unchanged, "
                     f"or use a new output directory")


def refuse_other_run(run_dir: Path, fingerprint: Any, what: str) -> None:
    """On the driver, before any work: refuses ``run_dir`` when it holds a run of another fingerprint."""
    check_fingerprint(stored_fingerprint(run_dir), fingerprint, run_dir, what)


def resumed_checkpoint(fingerprint: Any, what: str):
    """In a Ray Train worker: ``(checkpoint, state)`` of the epoch this run resumes after (its ``state.json``
    read, its fingerprint checked against ``fingerprint``), or ``(None, None)`` for a fresh run. Read the
    checkpoint's files with ``with checkpoint.as_directory() as d``."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None, None
    with ckpt.as_directory() as d:
        state = json.loads((Path(d) / STATE_FILE).read_text())
    check_fingerprint(state.get("fingerprint", {}), fingerprint, Path(ckpt.path).parent, what)
    return ckpt, state


def epoch_order(n: int, seed: int, epoch: int, rank: int, world: int, multiple: int) -> torch.Tensor:
    """This rank's positions (of ``range(n)``) for ``epoch``: a permutation seeded by (seed, epoch) only, the
    same on every worker, padded by repeating it from its head to a multiple of ``multiple`` (the preference
    trainer: the global batch, so every worker takes whole steps, even when ``n`` is below one batch; the head:
    the world size, so the shards are equal), then every ``world``-th from ``rank``."""
    if n < 1:
        raise ValueError("an epoch needs at least one item; got 0")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[torch.arange(n + (-n) % multiple) % n][rank::world]


def all_reduced(x: torch.Tensor, device, world: int) -> torch.Tensor:
    """The sum of ``x`` over the workers, on the CPU (``x`` itself with one worker)."""
    if world == 1:
        return x
    import torch.distributed as dist

    total = x.to(device)
    dist.all_reduce(total)
    return total.cpu()


def placement_info(device=None) -> dict:
    """Where the calling Ray worker or actor runs: its node id, the GPU ids Ray reserved for it and (given) the
    torch device it computes on."""
    import ray

    out = {"node_id": ray.get_runtime_context().get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}
    return out if device is None else {**out, "device": str(device)}


def rank_placements(device, world: int) -> list[dict]:
    """Every rank's :func:`placement_info`, in rank order; a collective (every rank of the group calls it)."""
    mine = placement_info(device)
    if world == 1:
        return [mine]
    import torch.distributed as dist

    every: list = [None] * world
    dist.all_gather_object(every, mine)
    return every


def report_epoch(epoch: int, metrics: dict, state: dict, *, rank: int, write: Callable[[Path], None],
                 every_rank: bool = False) -> None:
    """One epoch's ``ray.train.report``: ``write(folder)`` runs on every rank into a temporary folder, rank 0
    adds ``state.json`` (``{"epoch": epoch, **state}``), and the folder is this epoch's checkpoint
    ``epoch_NNNN``: rank 0's alone, or (``every_rank``) the union of every rank's files."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write(folder)
        if rank == 0:
            (folder / STATE_FILE).write_text(json.dumps({"epoch": epoch, **state}, indent=1))
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if every_rank or rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{epoch:04d}")


class EarlyStopping:
    """The best epoch by ``key(row)`` (higher is better; a tie keeps the earlier epoch) and whether to stop:
    after ``patience`` epochs in a row without improvement (``patience`` 0: never). ``history`` (rows with
    ``"epoch"``) replays the epochs of a resumed run, so it decides as an unbroken run would."""

    def __init__(self, patience: int, key: Callable[[dict], Any], history: Iterable[dict] = ()):
        self.patience, self.key = int(patience), key
        self.best_epoch, self.best, self.epoch = 0, None, 0
        for row in history:
            self.update(row)

    def update(self, row: dict) -> bool:
        """Records an epoch's row; True when it is the best so far."""
        k, self.epoch = self.key(row), int(row["epoch"])
        if self.best is None or k > self.best:
            self.best, self.best_epoch = k, self.epoch
            return True
        return False

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.best_epoch > 0 and self.epoch - self.best_epoch >= self.patience


def held_out(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, val)`` positions of ``range(n)``, each sorted: ``round(n * fraction)`` (at least 1 when
    ``fraction`` > 0) drawn by ``seed`` (the order of "epoch 0", which no epoch uses) are held out. A single
    item is not split (an alignment round whose filter kept one pair trains on it, with nothing to validate)."""
    if fraction <= 0 or n == 1:
        return list(range(n)), []
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise ValueError(f"holding out {fraction:g} of {n} pairs leaves none to train on")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def rss_mb() -> float:
    """This process's resident memory now, in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
