"""Where each side's SAE comes from: a registry of sources, every one ending in a sae-lens folder on disk.

- ``dir``: ``steer.<side>_sae_dir``, a sae-lens folder (e.g. one ``sparserm sae train`` wrote);
- ``registry``: ``steer.<side>_sae_registry`` (``release``, ``sae_id`` of sae-lens' registry, e.g. GemmaScope),
  fetched once by sae-lens and saved as a folder ``run.cache_dir/saes/registry-<hash>`` whose
  ``sparserm_sae.json`` records the release, the id, its Neuronpedia id and the layer (the audit links to
  Neuronpedia from it);
- ``train``: neither set: trained here with sae-lens (the ``sae`` section's width, k, lr, training tokens) at
  ``steer.<side>_layer``, exactly as ``rm train`` gets its SAE (``sae.stage.obtain_sae``, cached by the
  activation cache's key and the training settings), on the token sample of one ``sparserm features`` pass
  over ``data.sources``: the backbone cut after the deepest trained layer, the token sample of every trained
  side's layer recorded from that one forward (the activation cache keeps ``tokens_<layer>`` per layer).

Every source gives a folder, so the map's key (a content hash of each SAE folder) and everything after it read
one thing whatever the source.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from sparserm.config import Config, ConfigError, replace
from sparserm.manifest import stable_hash, write_json
from sparserm.storage import local_dir

SIDES = ("input", "output")


def pass_config(cfg: Config, layers) -> Config:
    """``cfg`` whose features pass reads ``layers`` (cut after the deepest) and whose SAE is trained here."""
    layers = sorted(set(layers))
    model = replace(cfg.model, layer=layers[-1], extra_layers=tuple(layers[:-1]))
    return replace(cfg, model=model, sae=replace(cfg.sae, source="train"))


def trained_saes(cfg: Config, layers, work_dir: str | Path) -> dict[int, dict]:
    """Per layer of ``layers``: ``{"folder", "quality"}`` of the SAE trained (or found cached) from one features
    pass reading every one of them; quality (fvu, l0, dead share on held-out tokens) is kept in the folder. Tracked
    as ``rm train``'s SAE is (``sae.stage.tracked_sae``): ``<work_dir>/tensorboard/sae-layer<L>/``."""
    from sparserm.features.stage import run_features
    from sparserm.sae.stage import tracked_sae

    pcfg = pass_config(cfg, layers)
    cache = run_features(pcfg, Path(work_dir))
    d_model = cache.summary["d_model"]
    out = {}
    for layer in pcfg.model.layers:
        _, folder, quality = tracked_sae(pcfg, cache, layer, d_model, Path(work_dir))
        quality_file = Path(folder) / "eval.json"  # in the folder's content hash (the map's key): written once
        if quality_file.is_file():
            quality = json.loads(quality_file.read_text())
        else:
            write_json(quality_file, quality)
        out[layer] = {"folder": str(folder), "quality": quality}
    return out


def fetch_registry_sae(release: str, sae_id: str, cache_dir: str | Path) -> Path:
    """A registry SAE saved as a sae-lens folder under ``cache_dir`` (fetched by sae-lens once, then reused)."""
    from sparserm.sae.autoencoder import META_FILE, load_registry

    folder = local_dir(cache_dir) / "saes" / f"registry-{stable_hash([release, sae_id])}"
    meta = folder / META_FILE
    if meta.is_file() and json.loads(meta.read_text()).get("complete"):
        return folder
    sae = load_registry(release, sae_id)  # SAELoadError naming the SAE when it cannot be had
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sae.sae.save_model(tmp)
    write_json(tmp / META_FILE, {"source": "registry", "release": release, "sae_id": sae_id,
                                 "neuronpedia_id": sae.neuronpedia_id, "layer": sae.layer, "complete": True})
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    return folder


def _from_dir(cfg: Config, side: str, work_dir: Path) -> str | None:
    return getattr(cfg.steer, f"{side}_sae_dir")  # checked by sources.sae_side, naming the key


def _from_registry(cfg: Config, side: str, work_dir: Path) -> str:
    reg = getattr(cfg.steer, f"{side}_sae_registry")
    return str(fetch_registry_sae(reg.release, reg.sae_id, cfg.run.cache_dir))


def train_layers(cfg: Config) -> list[int]:
    """The layers of the sides trained here (each side's ``steer.<side>_layer``, which must then be set)."""
    out = []
    for side in SIDES:
        if source_of(cfg, side) == "train":
            layer = getattr(cfg.steer, f"{side}_layer")
            if layer is None:
                raise ConfigError(f"steer.{side}_layer=None is invalid: steer.{side}_sae_dir and "
                                  f"steer.{side}_sae_registry are unset, so the {side} SAE is trained here, at the "
                                  f"layer this names (choose it with `sparserm steer layers`)")
            out.append(layer)
    return out


def _from_training(cfg: Config, side: str, work_dir: Path) -> str:
    layer = getattr(cfg.steer, f"{side}_layer")
    return trained_saes(cfg, train_layers(cfg), work_dir)[layer]["folder"]  # both sides: the same pass, cached


SOURCES: dict[str, Callable[[Config, str, Path], str | None]] = {
    "dir": _from_dir, "registry": _from_registry, "train": _from_training}


def source_of(cfg: Config, side: str) -> str:
    """The entry of ``SOURCES`` a side uses: ``dir`` when its folder is set, ``registry`` when its registry SAE is
    (``Config.validate`` refuses both), else ``train``."""
    if getattr(cfg.steer, f"{side}_sae_dir"):
        return "dir"
    return "registry" if getattr(cfg.steer, f"{side}_sae_registry") is not None else "train"


def sae_folder(cfg: Config, side: str, work_dir: str | Path) -> str | None:
    return SOURCES[source_of(cfg, side)](cfg, side, Path(work_dir))
