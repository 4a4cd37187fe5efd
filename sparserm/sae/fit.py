"""Train a TopK SAE with sae-lens (its ``TopKTrainingSAE`` and ``SAETrainer``) on cached activations.

The activations are scaled by one scalar so their mean squared norm is d (residual norms are in the
hundreds), ``b_dec`` starts at the data mean, TopK's AuxK loss revives dead latents, and the learning rate
decays over the last fifth of training. After training the decoder norms and the scale are folded into
the weights, so the saved SAE (a sae-lens folder: cfg.json + sae_weights.safetensors) works on raw
activations. Its ``sparserm_sae.json`` keeps each step's loss (``loss_history``); a ``tracker``
(``sparserm.tracking``) gets each step's metrics as sae-lens builds them for wandb, at sae-lens' step count.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import torch

from sparserm.sae.autoencoder import META_FILE, SparseAutoencoder
from sparserm.tracking import Tracker


def _batches(x: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    while True:
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            if len(idx) == batch_size:
                yield x[idx]


def _tracked_trainer(tracker: Tracker):
    """sae-lens' ``SAETrainer`` whose ``step`` (the public seam its ``fit`` calls once a step, before it counts
    the step) also records the step's loss and gives ``tracker`` the step's log dict (sae-lens' own, that it
    sends wandb), at the step's number (``n_training_steps``: 0, 1, ...)."""
    from sae_lens.training.sae_trainer import SAETrainer

    class TrackedTrainer(SAETrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.loss_history: list[float] = []

        def step(self, batch: torch.Tensor):
            out = super().step(batch)
            self.loss_history.append(out.loss.item())
            if tracker.active:
                tracker.log(self.build_train_step_log_dict(out, self.n_training_samples), self.n_training_steps)
            return out

    return TrackedTrainer


def train_sae(train_acts: torch.Tensor, *, width: int = 4096, k: int = 32, lr: float = 4e-4,
              batch_size: int = 1024, training_tokens: int = 2_000_000, normalize: bool = True, seed: int = 0,
              device: str = "cpu", out_dir: Path, layer: int, hook_name: str = "",
              progress: bool = True, tracker: Tracker | None = None) -> SparseAutoencoder:
    from sae_lens import SAE
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    if len(train_acts) < batch_size:
        raise ValueError(f"SAE training needs at least sae.batch_size={batch_size} tokens, got {len(train_acts)}")
    torch.manual_seed(seed)
    x = train_acts.float()
    d = x.shape[1]
    scale = float((d / x.pow(2).sum(-1).mean()).sqrt()) if normalize else 1.0
    x = (x * scale).to(device)
    cfg = TopKTrainingSAEConfig(d_in=d, d_sae=width, k=k, dtype="float32", device=device,
                                apply_b_dec_to_input=True, normalize_activations="none",
                                aux_loss_coefficient=1 / 32, rescale_acts_by_decoder_norm=True)
    sae = TopKTrainingSAE(cfg)
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    steps = max(1, training_tokens // batch_size)
    trainer_cfg = SAETrainerConfig(total_training_samples=steps * batch_size, train_batch_size_samples=batch_size,
                                   lr=lr, lr_end=lr / 10, lr_decay_steps=steps // 5, device=device,
                                   dead_feature_window=max(50, steps // 10), feature_sampling_window=max(100, steps // 5),
                                   n_checkpoints=0, save_final_checkpoint=False)
    t0 = time.time()
    trainer = _tracked_trainer(tracker or Tracker(None))(cfg=trainer_cfg, sae=sae,
                                                         data_provider=_batches(x, batch_size, seed))
    trainer.fit()
    seconds = time.time() - t0

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    sae.save_inference_model(tmp)
    inference = SAE.load_from_disk(str(tmp), device=device)
    inference.fold_W_dec_norm()  # unit decoder rows: rescaling by their norm is now a no-op, so turn it off
    inference.cfg.rescale_acts_by_decoder_norm = False
    if scale != 1.0:
        inference.fold_activation_norm_scaling_factor(scale)
    out_dir.mkdir(parents=True, exist_ok=True)
    inference.save_model(out_dir)
    meta = {"source": "train", "layer": layer, "hook_name": hook_name, "width": width, "k": k, "lr": lr,
            "batch_size": batch_size, "steps": steps, "n_tokens": len(train_acts), "scale_folded": scale,
            "seed": seed, "seconds": round(seconds, 1), "loss_history": trainer.loss_history, "complete": True}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return SparseAutoencoder.load(out_dir, device)
