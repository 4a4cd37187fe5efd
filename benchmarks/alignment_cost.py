"""GPU cost of a paper-scale iterative alignment, per stage, from a config: FLOPs counted from the model's shape and
the config's sizes, turned into GPU-hours by a device's throughput.

    python benchmarks/alignment_cost.py jobs/configs/gemma-2-2b-it.yaml [--peak-tflops 989 --hbm-tbs 3.35 ...]

Counted per round and task (``align.prompts_per_round`` prompts, T = max_prompt_tokens + max_new_tokens):
- generation (vLLM): prefill 2 N_f x prompt tokens and decode max_new_tokens per sample (samples per prompt from
  the task's labeller); prefill and scoring run at ``--mfu-prefill`` of peak, decode is bound by reading the
  weights once per step of ``generate.batch_size`` sequences at ``--bw-util`` of the HBM bandwidth;
- scoring (SparseRM): the model truncated after block L on both sides of each pair;
- DPO with LoRA: one reference pass (2 N_f T per sequence) and ``train.epochs`` of forward + backward without
  weight gradients (4 N_f T), at ``--mfu-train``; full fine-tuning counts 6 N_f T;
- evaluation (every round and once for the base): TruthfulQA MC over ``eval.mc_questions`` (0: all 817) with
  MC_CHOICES answers of MC_TOKENS tokens each, ``eval.hh_pairs`` pairs, ``eval.winrate_prompts`` generations and their scores.
N_f is the parameters a token's forward multiplies by: the transformer blocks plus the output head (the input
embedding is a lookup). The model shapes are the models' published configs (MODELS). The reward model's fit
(features pass, SAE, head) is one truncated pass over the preference data, listed apart.

The throughputs are inputs, not measurements: this repository's machines have no GPU (see README, "Paper
setups"); the defaults are an H100-SXM's data-sheet bf16 peak and HBM bandwidth with utilisations typical of
LoRA training and vLLM serving. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass(frozen=True)
class ModelShape:
    """A model's shape as its config.json gives it (parameters: the checkpoint's total)."""

    params: float  # all parameters
    n_layers: int
    d_model: int
    vocab: int
    tied: bool  # output head shares the input embedding

    @property
    def embedding(self) -> float:
        return float(self.vocab * self.d_model)

    @property
    def blocks(self) -> float:
        """Parameters of the transformer blocks (and final norm): all but the embedding and an untied head."""
        return self.params - self.embedding * (1 if self.tied else 2)

    @property
    def forward(self) -> float:
        """N_f: parameters a token's full forward multiplies by (blocks + output head)."""
        return self.blocks + self.embedding

    def truncated(self, layer: int) -> float:
        """Parameters a token's forward to the residual after block ``layer`` multiplies by (no head)."""
        return self.blocks * (layer + 1) / self.n_layers


MODELS = {
    "embedded": ModelShape(134_515_008, 30, 576, 49_152, True),  # SmolLM2-135M-Instruct
    "google/gemma-2-2b-it": ModelShape(2_614_341_888, 26, 2304, 256_000, True),
    "google/gemma-2-9b-it": ModelShape(9_241_705_984, 42, 3584, 256_000, True),
    "meta-llama/Llama-3.1-8B-Instruct": ModelShape(8_030_261_248, 32, 4096, 128_256, False),
    "google/gemma-3-270m-it": ModelShape(268_098_176, 18, 640, 262_144, True),
}
TRUTHFULQA_QUESTIONS = 817
MC_CHOICES = 8  # TruthfulQA MC: answers scored per question (mc1 and mc2 targets together, about 8 on average)
MC_TOKENS = 96  # tokens of one MC sequence (question and one answer in the chat template)


def samples_per_prompt(labeller: str, n_samples: int) -> int:
    from sparserm.align.labellers import PromptItem, get_labeller

    return len(get_labeller(labeller).conversations(PromptItem("truthfulqa", "q"), n_samples, 1000))


def stage_flops(cfg, shape: ModelShape) -> dict[str, float]:
    """FLOPs of each stage over the whole run (``align.rounds`` rounds, both tasks)."""
    a, g = cfg.align, cfg.align.generate
    t = g.max_prompt_tokens + g.max_new_tokens
    nf, nl = shape.forward, shape.truncated(cfg.model.layer)
    tasks = {"truthfulqa": g.labellers.truthfulqa, "harmless": g.labellers.harmless}
    out = {"generate_prefill": 0.0, "generate_decode": 0.0, "score": 0.0, "train": 0.0, "evaluate": 0.0}
    train_factor = 4 if a.train.finetune == "lora" else 6
    for labeller in tasks.values():
        n = a.prompts_per_round * samples_per_prompt(labeller, g.n_samples)  # sequences per round
        out["generate_prefill"] += a.rounds * n * 2 * nf * g.max_prompt_tokens
        out["generate_decode"] += a.rounds * n * 2 * nf * g.max_new_tokens
        out["score"] += a.rounds * n * 2 * nl * t
        pairs = a.prompts_per_round  # at most one pair per prompt survives labelling and the filter
        out["train"] += a.rounds * 2 * pairs * (2 + train_factor * a.train.epochs) * nf * t
    e = a.eval
    mc = (e.mc_questions or TRUTHFULQA_QUESTIONS) * MC_CHOICES * 2 * nf * MC_TOKENS
    hh = e.hh_pairs * 2 * 2 * nf * t
    win = e.winrate_prompts * (2 * nf * t + 2 * nl * t)
    out["evaluate"] = (a.rounds + 1) * (mc + hh + win)
    return out



def gpu_hours(cfg, shape: ModelShape, flops: dict, args) -> dict[str, float]:
    peak = args.peak_tflops * 1e12
    g = cfg.align.generate
    weight_bytes = 2 * shape.params  # bf16
    decode_tokens = flops["generate_decode"] / (2 * shape.forward)
    decode_s = decode_tokens / g.batch_size * weight_bytes / (args.hbm_tbs * 1e12 * args.bw_util)
    seconds = {"generate_prefill": flops["generate_prefill"] / (peak * args.mfu_prefill),
               "generate_decode": decode_s,
               "score": flops["score"] / (peak * args.mfu_prefill),
               "train": flops["train"] / (peak * args.mfu_train),
               "evaluate": flops["evaluate"] / (peak * args.mfu_prefill)}
    return {k: v / 3600 for k, v in seconds.items()}


def memory_gb(cfg, shape: ModelShape, gpu_gb: float) -> dict[str, float]:
    """Memory of each stage's model (bf16 weights; LoRA: the frozen weights plus activations of one micro-batch
    with gradient checkpointing; full: 16 bytes a parameter before ZeRO sharding; vLLM: its
    ``gpu_memory_utilization`` share of a ``gpu_gb`` GPU, weights and KV cache)."""
    t = cfg.align.generate.max_prompt_tokens + cfg.align.generate.max_new_tokens
    seqs = 2 * cfg.align.train.micro_batch_size
    ckpt_acts = seqs * t * shape.d_model * 2 * shape.n_layers  # one bf16 residual per block kept
    block_acts = 34 * seqs * t * shape.d_model  # the recomputed block (Korthikanti et al.'s 34 s b h bytes)
    lora = 2 * shape.params + ckpt_acts + block_acts
    return {"weights_bf16": 2 * shape.params / 1e9,
            "features_truncated": 2 * (shape.embedding + shape.truncated(cfg.model.layer)) / 1e9,
            "dpo_lora_micro_batch": lora / 1e9,
            "vllm_engine": cfg.align.generate.vllm.gpu_memory_utilization * gpu_gb,
            "full_finetune_unsharded": 16 * shape.params / 1e9}


def main(argv: list[str] | None = None) -> dict:
    from sparserm.config import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100-SXM data sheet)")
    p.add_argument("--hbm-tbs", type=float, default=3.35, help="HBM bandwidth, TB/s (H100-SXM data sheet)")
    p.add_argument("--mfu-train", type=float, default=0.2, help="share of peak a LoRA step reaches (micro-batch 4)")
    p.add_argument("--mfu-prefill", type=float, default=0.3, help="share of peak a forward-only pass reaches")
    p.add_argument("--gpu-gb", type=float, default=80.0, help="the GPU's memory (vLLM's share is of this)")
    p.add_argument("--bw-util", type=float, default=0.5, help="share of the bandwidth a decode step reaches")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    shape = MODELS.get(cfg.model.name)
    if shape is None:
        raise SystemExit(f"model {cfg.model.name!r}: no shape in MODELS ({', '.join(MODELS)})")
    flops = stage_flops(cfg, shape)
    hours = gpu_hours(cfg, shape, flops, args)
    result = {"model": cfg.model.name, "layer": cfg.model.layer, "rounds": cfg.align.rounds,
              "prompts_per_task": cfg.align.rounds * cfg.align.prompts_per_round,
              "pflops": {k: round(v / 1e15, 2) for k, v in flops.items()},
              "gpu_hours": {k: round(v, 3) for k, v in hours.items()},
              "gpu_hours_total": round(sum(hours.values()), 2),
              "memory_gb": {k: round(v, 1) for k, v in memory_gb(cfg, shape, args.gpu_gb).items()},
              "assumed": {"peak_tflops": args.peak_tflops, "hbm_tbs": args.hbm_tbs, "mfu_train": args.mfu_train,
                          "mfu_prefill": args.mfu_prefill, "bw_util": args.bw_util, "gpu_gb": args.gpu_gb}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
