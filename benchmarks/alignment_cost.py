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

Two estimates of the hours:
- ``gpu_hours``: at the throughput the flags assume; the defaults are an H100-SXM's data-sheet bf16 peak and HBM
  bandwidth with utilisations typical of LoRA training and vLLM serving (inputs, not measurements);
- ``measured_hours`` (with ``--measured RUN_DIR``): at the FLOP/s a finished ``sparserm align`` run reached on the
  device in each of its phases (``timings.json``: generation with labelling and scoring, DPO, evaluation), its
  FLOPs counted the same way from the work it did (``measured_rates``). ``benchmarks/gpu_check.sh`` makes such a
  run on a lent GPU and costs every paper config from it. Its phases include what the FLOPs leave out (loading
  the model, starting the engine, writing checkpoints); the measured run's small model uses a GPU less fully
  than a 2-9B one, so on a GPU the figure is an upper bound.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
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


def shape_of(name: str) -> ModelShape:
    """A model's shape: MODELS' entry, or a local model folder's ``config.json`` and safetensors."""
    if name in MODELS:
        return MODELS[name]
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"model {name!r}: no shape in MODELS ({', '.join(MODELS)}) and no model folder")
    from safetensors import safe_open

    c = json.loads((folder / "config.json").read_text())
    c = c.get("text_config", c)
    params = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            params += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    if not params:
        raise SystemExit(f"model {name!r}: no safetensors weights in the folder to count its parameters")
    return ModelShape(params, c["num_hidden_layers"], c["hidden_size"], c["vocab_size"],
                      c.get("tie_word_embeddings", True))


TRUTHFULQA_QUESTIONS = 817
MC_CHOICES = 8  # TruthfulQA MC: answers scored per question (mc1 and mc2 targets together, about 8 on average)
MC_TOKENS = 96  # tokens of one MC sequence (question and one answer in the chat template)


def samples_per_prompt(labeller: str, n_samples: int) -> int:
    from sparserm.align.labellers import PromptItem, get_labeller

    return len(get_labeller(labeller).conversations(PromptItem("truthfulqa", "q"), n_samples, 1000))


def generation_flops(shape: ModelShape, layer: int, sequences: float, prompt_tokens: float, new_tokens: float,
                     total_tokens: int) -> dict[str, float]:
    """Prefill, decode and SparseRM scoring of ``sequences`` samples (``new_tokens`` generated in all)."""
    return {"generate_prefill": sequences * 2 * shape.forward * prompt_tokens,
            "generate_decode": 2 * shape.forward * new_tokens,
            "score": sequences * 2 * shape.truncated(layer) * total_tokens}


def train_flops(shape: ModelShape, pairs: float, epochs: int, finetune: str, total_tokens: int) -> float:
    """One reference pass and ``epochs`` of forward + backward over both sides of ``pairs`` pairs."""
    return 2 * pairs * (2 + (4 if finetune == "lora" else 6) * epochs) * shape.forward * total_tokens


def eval_flops(shape: ModelShape, layer: int, mc_questions: int, hh_pairs: int, winrate_prompts: int,
               total_tokens: int) -> float:
    """One evaluation: TruthfulQA MC, HH pair likelihoods, win-rate generations and their scores."""
    nf, t = shape.forward, total_tokens
    return (mc_questions * MC_CHOICES * 2 * nf * MC_TOKENS + hh_pairs * 2 * 2 * nf * t
            + winrate_prompts * (2 * nf * t + 2 * shape.truncated(layer) * t))


def stage_flops(cfg, shape: ModelShape) -> dict[str, float]:
    """FLOPs of each stage over the whole run (``align.rounds`` rounds, both tasks), every sample at its maximum
    length."""
    a, g = cfg.align, cfg.align.generate
    t = g.max_prompt_tokens + g.max_new_tokens
    out = {"generate_prefill": 0.0, "generate_decode": 0.0, "score": 0.0, "train": 0.0, "evaluate": 0.0}
    for labeller in (g.labellers.truthfulqa, g.labellers.harmless):
        n = a.prompts_per_round * samples_per_prompt(labeller, g.n_samples)  # sequences per round
        for k, v in generation_flops(shape, cfg.model.layer, n, g.max_prompt_tokens, n * g.max_new_tokens, t).items():
            out[k] += a.rounds * v
        # at most one pair per prompt survives labelling and the filter
        out["train"] += a.rounds * train_flops(shape, a.prompts_per_round, a.train.epochs, a.train.finetune, t)
    e = a.eval
    out["evaluate"] = (a.rounds + 1) * eval_flops(shape, cfg.model.layer, e.mc_questions or TRUTHFULQA_QUESTIONS,
                                                  e.hh_pairs, e.winrate_prompts, t)
    return out


# a measured run's phases (its timings.json) and the stages each one's seconds cover
PHASES = {"generate+label+score": ("generate_prefill", "generate_decode", "score"), "dpo": ("train",),
          "evaluate": ("evaluate",)}


def _lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def measured_rates(run_dir: Path) -> dict:
    """FLOP/s reached in each phase of a finished ``sparserm align`` run: the FLOPs of the work it did (the
    samples' real generated lengths, the pairs each round trained on, the questions and pairs each evaluation
    scored), counted as :func:`stage_flops` counts them, over the seconds its ``timings.json`` gives the phase."""
    from sparserm.config import Config
    from sparserm.config_build import build

    run_dir = Path(run_dir)
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())
        seconds = json.loads((run_dir / "timings.json").read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--measured {run_dir}: not a finished `sparserm align` run folder ({exc})") from exc
    cfg = build(Config, manifest["config"]).validate()
    shape = shape_of(cfg.model.name)
    g, a, layer = cfg.align.generate, cfg.align, cfg.model.layer
    t = g.max_prompt_tokens + g.max_new_tokens
    flops = dict.fromkeys(PHASES, 0.0)

    def files(name: str) -> list[Path]:  # round_<r>/NAME (round 0, round 1's shared pairs), <filter>/round_<r>/NAME
        return sorted([*run_dir.glob(f"round_*/{name}"), *run_dir.glob(f"*/round_*/{name}")])

    for meta in files("generation.json"):
        st = json.loads(meta.read_text())
        parts = generation_flops(shape, layer, st["n_generated"], g.max_prompt_tokens, st["generated_tokens"], t)
        flops["generate+label+score"] += sum(parts.values())
    for done in files("train.json"):
        flops["dpo"] += train_flops(shape, _lines(done.parent / "pairs.jsonl"), a.train.epochs, a.train.finetune, t)
    for ev in files("eval.json"):
        m = json.loads(ev.read_text())["metrics"]
        gens = ev.parent / ("generations.jsonl" if ev.parent.name == "round_0" else "eval_generations.jsonl")
        flops["evaluate"] += eval_flops(shape, layer, m.get("n_questions", 0), m.get("n_harmless", 0), _lines(gens), t)
    missing = [k for k in PHASES if not flops[k] or not seconds.get(k)]
    if missing:
        raise SystemExit(f"--measured {run_dir}: no work or no seconds recorded for phase(s) {missing}: "
                         "use a run that finished at least one round")
    return {"run": str(run_dir), "model": cfg.model.name, "dtype": cfg.model.dtype,
            "machine": manifest.get("machine"), "seconds": {k: seconds[k] for k in PHASES}, "flops": flops,
            "tflop_per_s": {k: flops[k] / seconds[k] / 1e12 for k in PHASES}}


def gpu_hours(cfg, shape: ModelShape, flops: dict, args) -> dict[str, float]:
    """Hours of each stage at the throughput the flags assume (peak x utilisation; decode bandwidth bound)."""
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


def measured_hours(flops: dict, rates: dict) -> dict[str, float]:
    """Hours of each stage at the FLOP/s a measured run reached in the phase that holds it."""
    return {stage: flops[stage] / (rates["tflop_per_s"][phase] * 1e12) / 3600
            for phase, stages in PHASES.items() for stage in stages}


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
    p.add_argument("--measured", metavar="RUN_DIR", help="a finished `sparserm align` run on the device to cost: "
                   "its phases' FLOP/s give `measured_hours` beside the assumed `gpu_hours`")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    shape = shape_of(cfg.model.name)
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
    if args.measured:
        rates = measured_rates(Path(args.measured))
        measured = measured_hours(flops, rates)
        result.update(measured={**rates, "flops": {k: f"{v:.3e}" for k, v in rates["flops"].items()},
                                "tflop_per_s": {k: round(v, 4) for k, v in rates["tflop_per_s"].items()}},
                      measured_hours={k: round(v, 3) for k, v in measured.items()},
                      measured_hours_total=round(sum(measured.values()), 2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
