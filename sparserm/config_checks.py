"""The config rules across fields (``Config.validate``): what one annotation cannot say, checked after the tree
is built, each failure a ``ConfigError`` naming the dotted key."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sparserm.config_build import ConfigError, build, to_dict

if TYPE_CHECKING:
    from sparserm.config import Config


def validate(cfg: "Config") -> None:
    from sparserm.config import Config

    build(Config, to_dict(cfg))  # the annotations' types, ranges and choices, also for a Config made in code
    s = cfg.sae  # a registry/local SAE's width, layer and d_in are checked where it is read (sparserm.sae)
    _check(s.source != "registry" or bool(s.release and s.sae_id), "sae.release", s.release, "set, with sae.sae_id")
    _check(s.source != "local" or bool(s.path), "sae.path", s.path, "a folder")
    _check(s.source != "train" or 2 * cfg.reward.top_k <= s.width, "reward.top_k", cfg.reward.top_k,
           f"<= {s.width // 2}: 2 x top_k disjoint latents of sae.width={s.width}")
    from sparserm.align.labellers import LABELLERS
    from sparserm.align.objectives import OBJECTIVES
    from sparserm.serve.options import validate_serve

    validate_serve(cfg.serve)
    a = cfg.align
    g, t = a.generate, a.train
    _check(a.loss.name in OBJECTIVES, "align.loss.name", a.loss.name, "|".join(sorted(OBJECTIVES)))
    for m in cfg.fpo.methods:
        _check(m in OBJECTIVES, "fpo.methods", m, "|".join(sorted(OBJECTIVES)))
    _check(a.rounds >= 1, "align.rounds", a.rounds, ">= 1")
    _check(a.reference in ("previous", "base"), "align.reference", a.reference, "previous|base")
    _check(g.engine in ("auto", "hf", "vllm"), "align.generate.engine", g.engine, "auto|hf|vllm")
    _check(bool(a.filters) and set(a.filters) <= {"rm", "none"}, "align.filters", a.filters, "a list of rm|none")
    for task in ("truthfulqa", "harmless"):
        name = getattr(g.labellers, task)
        _check(name in LABELLERS, f"align.generate.labellers.{task}", name, "|".join(sorted(LABELLERS)))
        _check(not (LABELLERS[name].uses_rm and "rm" in a.filters), f"align.generate.labellers.{task}", name,
               f"a rule labeller when align.filters has rm: {name} pairs are labelled by the RM itself, so "
               "the RM filter would keep every pair (use filters: [none], or another labeller)")
        _check(name != "judge" or bool(g.judge_model), "align.generate.judge_model", g.judge_model,
               "a chat model id or folder for the judge labeller")
    _check(g.n_samples >= 2, "align.generate.n_samples", g.n_samples, ">= 2")
    _check(g.vllm.tensor_parallel_size == 1 or g.vllm.num_gpus == 1, "align.generate.vllm.num_gpus",
           g.vllm.num_gpus, "1 with tensor_parallel_size > 1 (two ranks on one GPU fail in NCCL)")
    _check(0 < g.vllm.gpu_memory_utilization <= 1, "align.generate.vllm.gpu_memory_utilization",
           g.vllm.gpu_memory_utilization, "in (0, 1]")
    _check(t.deepspeed_stage in (0, 1, 2, 3), "align.train.deepspeed_stage", t.deepspeed_stage, "0|1|2|3")
    _check(t.precision in ("auto", "bf16", "fp32"), "align.train.precision", t.precision, "auto|bf16|fp32")
    _check(t.backend in ("auto", "nccl", "gloo"), "align.train.backend", t.backend, "auto|nccl|gloo")
    _check(t.batch_size % (t.micro_batch_size * t.num_workers) == 0, "align.train.batch_size", t.batch_size,
           "a multiple of micro_batch_size x num_workers")
    _check(a.loss.beta is None or a.loss.beta > 0, "align.loss.beta", a.loss.beta, "> 0, or unset")
    from sparserm.steering.conditional_map import SPARSIFIERS
    from sparserm.steering.edit import MODES

    st = cfg.steer
    _check(st.sparsifier in SPARSIFIERS, "steer.sparsifier", st.sparsifier, "|".join(sorted(SPARSIFIERS)))
    _check(st.mode in MODES, "steer.mode", st.mode, "|".join(sorted(MODES)))
    _check(st.input_layer is None or st.output_layer is None or st.input_layer <= st.output_layer,
           "steer.input_layer", st.input_layer, f"<= steer.output_layer={st.output_layer} (the prompt gate is "
           "read before the edit, in the same forward)")
    for side in ("input", "output"):
        _check(getattr(st, f"{side}_sae_dir") is None or getattr(st, f"{side}_sae_registry") is None,
               f"steer.{side}_sae_registry", getattr(st, f"{side}_sae_registry"),
               f"unset when steer.{side}_sae_dir is set (one SAE per side)")
    

def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")
