"""Backbone loading: the embedded default, a hub id, a local HF folder, or a GGUF file.

``load_backbone(cfg, cache_dir, truncate=True)`` returns the decoder stack cut after the deepest
requested layer: later blocks, the final norm and the LM head are never run.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparserm.config import ModelConfig
from sparserm.model.embedded import embedded_model_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BackboneError(ValueError):
    pass


@dataclass
class Backbone:
    """A decoder stack (``model``: the base model, e.g. LlamaModel) and its tokenizer."""

    model: nn.Module
    tokenizer: Any
    name: str
    layers: tuple[int, ...]  # residual streams this backbone returns
    n_layers_total: int  # blocks in the full model
    d_model: int
    device: torch.device

    @property
    def n_layers_run(self) -> int:
        return len(decoder_layers(self.model))


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when a GPU is visible and, inside a Ray task or actor, reserved for it. Ray leaves
    CUDA_VISIBLE_DEVICES alone for an actor that asked for no GPU, so such an actor sees the node's GPUs;
    it must not use them (they belong to the actors that reserved them)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and _gpu_reserved() else "cpu")
    return torch.device(device)


def _gpu_reserved() -> bool:
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return True  # a plain process or the driver: every visible GPU is its own
    return bool(ray.get_gpu_ids())


def resolve_source(cfg: ModelConfig, cache_dir: str | Path) -> tuple[str, dict]:
    """(path-or-id, extra from_pretrained kwargs) for the configured model."""
    if cfg.name == "embedded":
        return str(embedded_model_dir(cache_dir)), {}
    p = Path(cfg.name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise BackboneError(f"model.name: GGUF file {p} does not exist")
        return str(p.parent), {"gguf_file": p.name}
    if p.exists() and not p.is_dir():
        raise BackboneError(f"model.name: {p} is a file but not a .gguf file")
    kwargs: dict = {}
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if not p.is_dir() and (cfg.name.startswith((".", "/", "~")) or cfg.name.count("/") != 1):
        raise BackboneError(f"model.name: {cfg.name!r} is neither an existing folder, a .gguf file, "
                            f"'embedded', nor a hub id of the form owner/name")
    return (str(p) if p.is_dir() else cfg.name), kwargs


def load_tokenizer(cfg: ModelConfig, cache_dir: str | Path):
    from transformers import AutoTokenizer

    source, kwargs = resolve_source(cfg, cache_dir)
    tok = AutoTokenizer.from_pretrained(source, **kwargs)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(cfg: ModelConfig, cache_dir: str | Path, device: torch.device | None = None):
    """The full causal LM (for generation and log-probs) and its tokenizer."""
    from transformers import AutoModelForCausalLM

    source, kwargs = resolve_source(cfg, cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[cfg.dtype], **kwargs)
    except OSError as exc:
        raise BackboneError(f"model.name: cannot load {cfg.name!r} ({exc})") from exc
    model.eval().to(device or resolve_device(cfg.device))
    return model, load_tokenizer(cfg, cache_dir)


@contextmanager
def quiet_peft():
    """Around a peft call that wraps a model: peft reads transformers' deprecated ``is_gradient_checkpointing``,
    a FutureWarning for them to mend that every Ray worker and engine loading an adapter would print."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def decoder_layers(base: nn.Module) -> nn.ModuleList:
    for attr in ("layers", "h", "blocks"):
        mods = getattr(base, attr, None)
        if isinstance(mods, nn.ModuleList):
            return mods
    raise BackboneError(f"cannot find the decoder blocks of {type(base).__name__}")


def base_model(causal_lm: nn.Module) -> nn.Module:
    base = getattr(causal_lm, "model", None) or getattr(causal_lm, "transformer", None)
    if base is None:
        raise BackboneError(f"cannot find the base model inside {type(causal_lm).__name__}")
    # Multimodal wrappers (e.g. Gemma 3) keep the text stack one level further down.
    return getattr(base, "language_model", base)


def truncate_after(base: nn.Module, last_layer: int) -> nn.Module:
    """Cut the decoder stack after block ``last_layer`` and make the final norm the identity, so the
    last hidden state is the raw residual stream after that block."""
    blocks = decoder_layers(base)
    if not 0 <= last_layer < len(blocks):
        raise BackboneError(f"model.layer {last_layer} is out of range: the model has {len(blocks)} blocks")
    for attr in ("layers", "h", "blocks"):
        if getattr(base, attr, None) is blocks:
            setattr(base, attr, nn.ModuleList(list(blocks)[: last_layer + 1]))
    if hasattr(base, "norm"):
        base.norm = nn.Identity()
    config = base.config
    config.num_hidden_layers = last_layer + 1
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[: last_layer + 1]
    return base


def load_backbone(cfg: ModelConfig, cache_dir: str | Path, device: torch.device | None = None) -> Backbone:
    model, tok = load_causal_lm(cfg, cache_dir, device)
    n_total = len(decoder_layers(base_model(model)))
    last = max(cfg.layers)
    base = truncate_after(base_model(model), last)
    del model  # the LM head and the cut blocks go with it
    return Backbone(model=base, tokenizer=tok, name=cfg.name, layers=cfg.layers, n_layers_total=n_total,
                    d_model=base.config.hidden_size, device=next(base.parameters()).device)
