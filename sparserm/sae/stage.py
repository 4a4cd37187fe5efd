"""Stage ``sae``: the configured SAE, ready for the reward model, with its quality measured.

``source=train`` (the embedded default, or any model without a published SAE) fits sae-lens' TopK SAE on
the token residuals the features pass sampled from train-split texts; tokens with massive activations
(norm > factor x median; in SmolLM2 the newline token) are left out of the fit. Quality is measured on
tokens of held-out (eval-split) texts: ``fvu`` without the massive tokens (headline), ``fvu_all`` with them.
The trained SAE is cached by the activation cache's key and the training settings.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from sparserm.config import Config
from sparserm.features.cache import ActivationCache
from sparserm.manifest import stable_hash, write_json, write_manifest
from sparserm.model.backbone import resolve_device
from sparserm.sae import SparseAutoencoder, evaluate_sae, load_sae, massive_token_mask, train_sae
from sparserm.sae.autoencoder import META_FILE
from sparserm.sae.checks import check_sae, read_shape, shape_of
from sparserm.storage import local_dir, pull, push
from sparserm.tracking import Tracker, tracking_spec

EVAL_TOKENS = 30_000  # held-out tokens evaluated (enough for a stable fvu, seconds of compute)


def trained_sae_dir(cfg: Config, cache: ActivationCache, layer: int) -> Path:
    key = stable_hash({"activations": cache.root.name, "layer": layer, "sae": asdict(cfg.sae),
                       "outliers": cfg.features.outlier_norm_factor, "limit": cfg.features.max_sample_tokens})
    return local_dir(cfg.run.cache_dir) / "saes" / key


def eval_tokens(cache: ActivationCache, layer: int, d_model: int, seed: int) -> torch.Tensor:
    acts, _ = cache.read_tokens(layer, d_model, limit=EVAL_TOKENS, split="eval", seed=seed)
    return acts


def obtain_sae(cfg: Config, cache: ActivationCache, layer: int, d_model: int,
               tracker: Tracker | None = None) -> tuple[SparseAutoencoder, Path | None]:
    """Load (registry/local) or train-and-cache (train) the SAE for ``layer``; (sae, folder or None). A loaded SAE
    is checked against ``reward.top_k``, ``model.layer`` and ``d_model``: from its config before the download, and
    again as loaded. A training run logs each step to ``tracker``."""
    device = resolve_device(cfg.model.device)
    if cfg.sae.source != "train":
        check_sae(cfg, read_shape(cfg.sae), d_model)
        sae = load_sae(cfg.sae, device=device)
        check_sae(cfg, shape_of(sae), d_model)
        return sae, (Path(cfg.sae.path) if cfg.sae.path else None)
    folder = trained_sae_dir(cfg, cache, layer)
    if not _complete(folder) and pull(cfg.run.cache_dir, folder):
        print(f"[sae] pulled from {cfg.run.cache_dir}: {folder.name}", flush=True)
    if _complete(folder):
        print(f"[sae] trained SAE found in cache: {folder}", flush=True)
        return load_sae(cfg.sae, device=device, trained_dir=folder), folder
    acts, _ = cache.read_tokens(layer, d_model, limit=cfg.features.max_sample_tokens, split="train", seed=cfg.run.seed)
    massive = massive_token_mask(acts, cfg.features.outlier_norm_factor)
    train = acts[~massive]
    print(f"[sae] training on {len(train)} tokens of layer {layer} ({int(massive.sum())} massive tokens left out)",
          flush=True)
    t0 = time.time()
    s = cfg.sae
    sae = train_sae(train, width=s.width, k=s.k, lr=s.lr, batch_size=s.batch_size, training_tokens=s.training_tokens,
                    normalize=s.normalize, seed=cfg.run.seed, device=str(device), out_dir=folder, layer=layer,
                    hook_name=f"{cfg.model.name}:layers.{layer}", progress=True, tracker=tracker)
    write_json(folder / "training.json", {"n_train_tokens": len(train), "n_massive_excluded": int(massive.sum()),
                                          "seconds": round(time.time() - t0, 1), "activation_cache": str(cache.root)})
    write_json(folder / "evaluation_source.json", {"activation_cache": str(cache.root), "layer": layer,
                                                    "outlier_norm_factor": cfg.features.outlier_norm_factor,
                                                    "seed": cfg.run.seed})
    push(cfg.run.cache_dir, folder, marker=META_FILE)
    return sae, folder


def _complete(folder: Path) -> bool:
    """A trained SAE's folder holds it whole (its meta file, written last, says so)."""
    return (folder / META_FILE).is_file() and bool(json.loads((folder / META_FILE).read_text()).get("complete"))


def measure(sae: SparseAutoencoder, acts: torch.Tensor, factor: float) -> dict:
    metrics = evaluate_sae(sae, acts, massive_token_mask(acts, factor))
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in metrics.items()}


def tracked_sae(cfg: Config, cache: ActivationCache, layer: int, d_model: int,
                out_dir: Path) -> tuple[SparseAutoencoder, Path | None, dict]:
    """``obtain_sae`` and its quality on held-out tokens (``measure``), tracked (``sparserm.tracking``) into
    ``<out_dir>/tensorboard/sae-layer<L>/``: a training run's steps (sae-lens' metrics at steps 0, 1, ...), then
    the quality as ``eval/<key>`` at the SAE's step count (0 for an SAE not trained here)."""
    key = trained_sae_dir(cfg, cache, layer).name if cfg.sae.source == "train" else stable_hash(asdict(cfg.sae))
    spec = tracking_spec(cfg.tracking, Path(out_dir, "tensorboard", f"sae-layer{layer}"), "sae",
                         {"layer": layer, "fingerprint": key})
    with Tracker(spec) as tracker:
        sae, folder = obtain_sae(cfg, cache, layer, d_model, tracker)
        metrics = measure(sae, eval_tokens(cache, layer, d_model, cfg.run.seed), cfg.features.outlier_norm_factor)
        meta = Path(folder, META_FILE) if folder else None
        steps = json.loads(meta.read_text()).get("steps", 0) if meta and meta.is_file() else 0
        tracker.log(metrics, steps, prefix="eval/")
    return sae, folder, metrics


def run_sae_stage(cfg: Config, out_dir: Path) -> tuple[Path, dict]:
    from sparserm.features.stage import run_features

    cache = run_features(cfg, out_dir)
    layer, d_model = cfg.model.layer, cache.summary["d_model"]
    sae, folder, metrics = tracked_sae(cfg, cache, layer, d_model, out_dir)
    if folder is not None:
        training = folder / "training.json"
        if training.is_file():
            metrics["training_seconds"] = json.loads(training.read_text())["seconds"]
            metrics["n_train_tokens"] = json.loads(training.read_text())["n_train_tokens"]
        write_json(folder / "eval.json", metrics)
    write_json(out_dir / "sae_eval.json", metrics)
    write_manifest(out_dir, cfg, "sae", extra={"activation_cache": str(cache.root), "sae_dir": str(folder)})
    return (folder or out_dir), metrics


def evaluate_sae_dir(sae_dir: Path) -> dict:
    """Re-measure a trained SAE folder on the held-out tokens of the activation cache it was trained from."""
    src = sae_dir / "evaluation_source.json"
    if not src.is_file():
        raise FileNotFoundError(f"{sae_dir} has no evaluation_source.json: not an SAE trained by sparserm")
    info = json.loads(src.read_text())
    sae = SparseAutoencoder.load(sae_dir)
    cache = ActivationCache(info["activation_cache"])
    acts = eval_tokens(cache, info["layer"], sae.d_in, info["seed"])
    return measure(sae, acts, info["outlier_norm_factor"])
