"""Where a preference objective's reference comes from, by the kind it declares (``Objective.reference``).

``REFERENCE_SOURCES[kind](ctx)`` builds, on every Ray Train worker after ``deepspeed.initialize``, an object
whose ``for_batch(idx, dtype)`` gives the reference's :class:`PairForward` for the pairs ``idx`` of a
micro-batch:

- ``"sequence"`` (DPO): summed response log-probs and token counts of every pair, computed once per round
  through the DeepSpeed engine itself (same dtype, same weights: u = 0 before the first step), the pairs split
  over the workers and all-reduced; stored in each checkpoint (``reference.safetensors``) and read back on
  resume.
- ``"sequence_online"`` (DPO with ``align.train.reference_online``): the same stats, by a reference forward
  at every micro-batch, as TRL and OpenRLHF run DPO (the memory baseline of ``benchmarks/fpo_memory.py``).
- ``"token"`` (TDPO-2): the reference's per-token distributions, online at every micro-batch (they are
  [T, V] per response: too large to keep).

An online reference is the untuned model (``align.reference: base``, or the first round of ``previous``)
through the same engine with the LoRA adapter disabled, else (full fine-tuning, or a round that starts from
an adapter) a second frozen copy of the weights: the memory cost the FPO paper measures against.
- ``"features"`` (FPO): read from the offline reference cache (``sparserm.fpo.reference_cache``) that the
  driver built before training: no reference model is built and no reference forward runs on the workers.

``forwards`` counts the reference forwards a worker ran before training and ``forwards_in_steps`` those during
the steps; the trainer records both in the first epoch's history.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
import torch

from sparserm.align.objectives import PairStats
from sparserm.align.pair_forward import PairForward, pair_forward


@dataclass
class ReferenceContext:
    engine: object  # the DeepSpeed engine (its module: the peft model)
    seqs: list[tuple]
    rank: int
    world: int
    micro: int
    pad_id: int
    device: torch.device
    reference: str  # align.reference: previous | base
    init_adapter: str | None  # the adapter the round starts from
    model: dict  # ModelConfig as a dict
    cache_dir: str
    stored: dict | None  # the reference tensors of the checkpoint being resumed, if any
    weights: object  # sparserm.align.finetune.FINETUNE entry: what the run trains (LoRA or every weight)
    features_cache: str | None = None  # the offline reference cache folder ("features")
    features_key: dict | None = None  # the key that cache must have


class SequenceReference:
    kind = "sequence"

    def __init__(self, ctx: ReferenceContext):
        self.device, self.forwards_in_steps = ctx.device, 0
        if ctx.stored is not None:
            self.stats, self.forwards = _from_stored(dict(ctx.stored), ctx.seqs), 0
            return
        engine = ctx.engine
        engine.eval()
        with _as_base(ctx) if ctx.reference == "base" else contextlib.nullcontext():
            self.stats, self.forwards = _sequence_pass(ctx)

    def for_batch(self, idx: list[int], dtype) -> PairForward:
        return PairForward(self.stats.select(idx).to(self.device, dtype))

    def to_save(self) -> dict[str, torch.Tensor] | None:
        return self.stats.as_dict()


def _sequence_pass(ctx: ReferenceContext) -> tuple[PairStats, int]:
    import torch.distributed as dist

    n = len(ctx.seqs)
    out = torch.zeros(4, n, dtype=torch.float64)  # chosen, rejected, chosen_tokens, rejected_tokens
    # as many forwards on every rank (ZeRO-3 gathers each layer collectively; a rank with one forward fewer
    # would leave the others waiting): positions past the end repeat pairs and are not kept
    mine, forwards = list(range(ctx.rank, -(-n // ctx.world) * ctx.world, ctx.world)), 0
    with torch.no_grad():
        for b in range(0, len(mine), ctx.micro):
            pos = mine[b: b + ctx.micro]
            stats = pair_forward(ctx.engine, ctx.seqs, [j % n for j in pos], ctx.pad_id, ctx.device).stats
            real = [k for k, j in enumerate(pos) if j < n]
            out[:, [pos[k] for k in real]] = torch.stack(stats.as_tuple()).double().cpu()[:, real]
            forwards += 1
    if ctx.world > 1:
        both = out.to(ctx.device)
        dist.all_reduce(both)
        out = both.cpu()
    return PairStats(*out), forwards


def _from_stored(d: dict, seqs: list[tuple]) -> PairStats:
    for side, j in (("chosen", 0), ("rejected", 1)):  # checkpoints of before the counts were stored
        d.setdefault(f"{side}_tokens", torch.tensor([float(len(s[j][1])) for s in seqs], dtype=torch.float64))
    return PairStats.from_dict(d)


def _as_base(ctx: ReferenceContext):
    """The engine computing as the untuned base: LoRA's adapter off; full fine-tuning starts at the base, so
    before the first step the weights are the base."""
    return ctx.weights.adapter_off(ctx.engine.module) or contextlib.nullcontext()


def frozen_reference(model_cfg: dict, cache_dir: str, device, adapter: str | None, dtype: torch.dtype):
    """The base model, plus ``adapter`` when given (applied as peft applies it to the policy), its floating
    parameters cast to ``dtype`` as DeepSpeed casts the policy's, in eval mode with no gradients: the reference
    the FPO cache pass and an online reference copy both compute with."""
    from sparserm.config import ModelConfig, build
    from sparserm.model.backbone import load_causal_lm, quiet_peft

    model, tok = load_causal_lm(build(ModelConfig, model_cfg), cache_dir, device)
    if adapter is not None:
        from peft import PeftModel

        with quiet_peft():
            model = PeftModel.from_pretrained(model, adapter)
    for p in model.parameters():
        p.requires_grad_(False)
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model.eval(), tok


class OnlineReference:
    """A reference forward at every micro-batch. Through the trained weights with LoRA's adapter off where that
    is the reference (the base: ``align.reference: base``, or a first round); otherwise (full fine-tuning, or
    a round that starts from an adapter) a second, frozen copy: the base weights, plus that adapter."""

    kind, needs = "sequence_online", frozenset()

    def __init__(self, ctx: ReferenceContext):
        self.ctx, self.forwards, self.forwards_in_steps = ctx, 0, 0
        base_is_reference = ctx.reference == "base" or not ctx.init_adapter
        self.copy = None
        if not (base_is_reference and ctx.weights.can_switch_off):
            dtype = next(ctx.engine.module.parameters()).dtype
            self.copy, _ = frozen_reference(ctx.model, ctx.cache_dir, ctx.device,
                                            None if base_is_reference else ctx.init_adapter, dtype)

    def for_batch(self, idx: list[int], dtype) -> PairForward:
        ctx = self.ctx
        model = self.copy if self.copy is not None else ctx.engine
        with torch.no_grad(), _as_base(ctx) if self.copy is None else contextlib.nullcontext():
            out = pair_forward(model, ctx.seqs, idx, ctx.pad_id, ctx.device, self.needs)
        self.forwards_in_steps += 1
        return out

    def to_save(self) -> None:
        return None


class TokenReference(OnlineReference):
    """TDPO-2's per-token reference distributions: always online ([T, V] per response is too large to keep)."""

    kind, needs = "token", frozenset({"token"})


class FeatureReference:
    kind = "features"

    def __init__(self, ctx: ReferenceContext):
        from sparserm.fpo.reference_cache import load_reference_cache

        if not ctx.features_cache:
            raise ValueError("an objective with reference 'features' needs the offline reference cache")
        self.cache = load_reference_cache(ctx.features_cache, ctx.features_key)
        if self.cache.n_pairs != len(ctx.seqs):
            raise ValueError(f"{ctx.features_cache}: the cache holds {self.cache.n_pairs} pairs, "
                             f"the run trains {len(ctx.seqs)}")
        self.device, self.forwards, self.forwards_in_steps = ctx.device, 0, 0

    def for_batch(self, idx: list[int], dtype) -> PairForward:
        c = self.cache
        return PairForward(c.stats.select(idx).to(self.device, dtype),
                           chosen_features=c.features(idx, "chosen", self.device),
                           rejected_features=c.features(idx, "rejected", self.device))

    def to_save(self) -> None:
        return None


class NoReference:
    kind = "none"
    forwards = forwards_in_steps = 0

    def __init__(self, ctx: ReferenceContext):
        pass

    def for_batch(self, idx, dtype) -> None:
        return None

    def to_save(self) -> None:
        return None


REFERENCE_SOURCES = {c.kind: c for c in (NoReference, SequenceReference, OnlineReference, TokenReference,
                                           FeatureReference)}


def reference_source(kind: str, online: bool):
    """The source of an objective's reference kind; ``online`` (``align.train.reference_online``) picks the
    kind's every-step variant where it has one (``sequence_online``)."""
    return REFERENCE_SOURCES.get(f"{kind}_online", REFERENCE_SOURCES[kind]) if online else REFERENCE_SOURCES[kind]


def uses_features(objective) -> bool:
    return objective.reference == "features" or "features" in objective.policy_needs


def feature_source(loss_cfg) -> tuple[str, int]:
    """The SAE folder and the block it reads for a feature-level objective (``align.loss.fpo_sae_dir``;
    ``fpo_layer``, else the layer the SAE folder records), refused with the key to set when missing."""
    import json

    from sparserm.sae.autoencoder import META_FILE
    from sparserm.sae.checks import shape_from_cfg

    folder = loss_cfg.fpo_sae_dir
    if not folder or not Path(folder, "cfg.json").is_file():
        raise ValueError(f"align.loss.name={loss_cfg.name!r} needs align.loss.fpo_sae_dir: a sae-lens SAE folder "
                         f"(got {folder!r})")
    meta_file = Path(folder, META_FILE)
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    layer = loss_cfg.fpo_layer
    if layer is None:
        layer = shape_from_cfg(json.loads(Path(folder, "cfg.json").read_text()), meta).layer
    if layer is None:
        raise ValueError(f"{folder}: the SAE records no layer; set align.loss.fpo_layer")
    return str(Path(folder).resolve()), int(layer)


def feature_inputs(cfg, objective, pairs: list[dict], run_dir: Path, init_adapter: str | None,
                   progress: bool) -> dict:
    """On the driver (``train_dpo``): SAE and layer for a feature-level objective; for reference ``features``, the
    offline reference cache of these pairs under this round's reference (``align.reference``), built here (one
    Ray Data pass) unless a matching one is in ``<run>/reference_cache``."""
    if not uses_features(objective):
        return {}
    sae_dir, layer = feature_source(cfg.align.loss)
    out = {"sae_dir": sae_dir, "layer": layer}
    if objective.reference == "features":
        from sparserm.fpo.reference_cache import build_reference_cache, cache_key

        adapter = init_adapter if cfg.align.reference == "previous" else None
        out["cache"] = str(build_reference_cache(cfg, pairs, run_dir / "reference_cache", adapter=adapter,
                                                 sae_dir=sae_dir, layer=layer, progress=progress))
        out["cache_key"] = cache_key(cfg, pairs, adapter, sae_dir, layer)
    return out
