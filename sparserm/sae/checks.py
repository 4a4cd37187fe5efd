"""The SAE against the config, before the features pass and again when it is loaded: ``2 x reward.top_k`` disjoint
latents fit in its width ``d_sae``, it reads the residual stream of ``model.layer`` (its hook, e.g.
``blocks.13.hook_resid_post``), and its ``d_in`` is the model's hidden size. A mismatch is a ``ConfigError`` naming
the fields, raised before an hour of model passes rather than after.

Read cheaply, without weights: a local folder's ``cfg.json`` (and ``sparserm_sae.json``), a registry SAE's config
from sae-lens' config getter (computed from the id for GemmaScope, a small download for others), the model's
``config.json``. What cannot be read here (no network) is checked at load.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from sparserm.config import Config, ConfigError, SAEConfig
from sparserm.sae.autoencoder import META_FILE, SAELoadError, SparseAutoencoder, registry_entry


@dataclass(frozen=True)
class SAEShape:
    d_in: int | None
    d_sae: int | None
    layer: int | None  # the residual stream it reads, in model.layer's terms (after model.model.layers[layer])
    hook_name: str | None = None


def layer_of_hook(hook_name: str | None) -> int | None:
    """``blocks.13.hook_resid_post`` -> 13; ``blocks.13.hook_resid_pre`` -> 12 (the stream after block 12); an SAE
    trained here (``<model>:layers.13``) -> 13; None when the name holds no layer."""
    found = re.findall(r"(?:blocks|layers)\.(\d+)(\.hook_resid_pre)?", hook_name or "")
    return int(found[-1][0]) - bool(found[-1][1]) if found else None


def shape_from_cfg(cfg: dict, meta: dict | None = None) -> SAEShape:
    """From a sae-lens config (flat, or with ``metadata``) and sparserm's ``sparserm_sae.json``."""
    md, meta = cfg.get("metadata") or {}, meta or {}
    hook = cfg.get("hook_name") or md.get("hook_name") or meta.get("hook_name") or None
    layer = layer_of_hook(hook)
    if layer is None:
        layer = meta.get("layer", cfg.get("hook_layer", md.get("hook_layer")))
    return SAEShape(cfg.get("d_in"), cfg.get("d_sae"), layer, hook)


def shape_of(sae: SparseAutoencoder) -> SAEShape:
    hook = getattr(getattr(sae.sae.cfg, "metadata", None), "hook_name", None) or None
    layer = layer_of_hook(hook)
    return SAEShape(sae.d_in, sae.d_sae, sae.layer if layer is None else layer, hook)


def read_shape(sae_cfg: SAEConfig) -> SAEShape | None:
    """The configured SAE's shape without its weights; None for ``source=train`` or where its config cannot be
    fetched here. A missing local folder or an unknown registry id raises ``SAELoadError`` at once."""
    if sae_cfg.source == "local":
        path = Path(sae_cfg.path)
        if not (path / "cfg.json").is_file():
            raise SAELoadError(f"sae.path={sae_cfg.path!r} is not a sae-lens SAE folder (no cfg.json)")
        meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).is_file() else {}
        return shape_from_cfg(json.loads((path / "cfg.json").read_text()), meta)
    if sae_cfg.source == "registry":
        from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface

        registry_entry(sae_cfg.release, sae_cfg.sae_id)
        try:
            return shape_from_cfg(load_sae_config_from_huggingface(sae_cfg.release, sae_cfg.sae_id))
        except Exception:  # no network to the hub, a loader that needs the weights: checked at load instead
            return None
    return None


def model_hidden_size(cfg: Config) -> int | None:
    """The model's hidden size from its config alone (no weights); None where it cannot be read here."""
    from transformers import AutoConfig

    from sparserm.model.backbone import resolve_source

    try:
        source, kwargs = resolve_source(cfg.model, cfg.run.cache_dir)
        return int(AutoConfig.from_pretrained(source, **kwargs).get_text_config().hidden_size)
    except Exception:  # no network, a GGUF transformers cannot read the config of: checked at load instead
        return None


def describe(sae_cfg: SAEConfig) -> str:
    if sae_cfg.source == "registry":
        return f"the SAE sae.release={sae_cfg.release!r} sae.sae_id={sae_cfg.sae_id!r}"
    return f"the SAE at sae.path={sae_cfg.path!r}" if sae_cfg.source == "local" else "the SAE trained here"


def check_sae(cfg: Config, shape: SAEShape | None, d_model: int | None) -> None:
    """``ConfigError`` naming the fields when ``reward.top_k``, ``model.layer`` or the model's hidden size
    ``d_model`` do not fit the SAE of ``shape`` (unknown parts, None, are not checked)."""
    if shape is None:
        return
    what, k = describe(cfg.sae), cfg.reward.top_k
    if shape.d_sae is not None and 2 * k > shape.d_sae:
        raise ConfigError(f"reward.top_k={k} is too large for {what}: 2 x top_k disjoint latents need "
                          f"2 x {k} <= its width d_sae={shape.d_sae} (reward.top_k <= {shape.d_sae // 2})")
    if shape.layer is not None and shape.layer != cfg.model.layer:
        raise ConfigError(f"model.layer={cfg.model.layer} does not match {what}: it reads layer {shape.layer} "
                          f"(hook {shape.hook_name}); set model.layer={shape.layer}, or use an SAE of layer "
                          f"{cfg.model.layer}")
    if shape.d_in is not None and d_model is not None and shape.d_in != d_model:
        raise ConfigError(f"{what} has d_in={shape.d_in}, but model.name={cfg.model.name!r} has hidden size "
                          f"{d_model}: the SAE belongs to another model")


def preflight(cfg: Config) -> None:
    """Before the features pass: the configured registry/local SAE against ``reward.top_k``, ``model.layer`` and
    the model's hidden size, from configs only (an SAE trained here is checked by ``Config.validate``)."""
    shape = read_shape(cfg.sae)
    check_sae(cfg, shape, model_hidden_size(cfg) if shape is not None and shape.d_in is not None else None)
