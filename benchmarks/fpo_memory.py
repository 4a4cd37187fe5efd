"""Training memory and step time of FPO against DPO, TDPO-2 and SimPO, in full fine-tuning and LoRA: the real
trainer (``sparserm.align.trainer.train_dpo``: DeepSpeed on Ray Train), the same pairs and steps for every
method, each run in a fresh process of its own (a subprocess, ``benchmarks/fpo_memory_runs.py`` on the run's
spec, that starts its own Ray), so no run's allocations reach another's peak. The methods, as the FPO paper
compares them: DPO with its reference online, TDPO-2, SimPO and FPO with its offline reference cache; each
one's settings and what a run measures are described in ``benchmarks/fpo_memory_runs.py``, which builds and
runs each one. This file: the arguments, the runs in turn, the ratios against the targets and the report.

    python benchmarks/fpo_memory.py [--model embedded|tiny|FOLDER] [--finetune full,lora]
                                    [--methods dpo,tdpo2,simpo,fpo] [--steps 6] [--batch-size 4]
                                    [--micro-batch 4] [--pairs N] [--max-tokens 192] [--sae-dir DIR]

Pairs: the first ``steps x batch-size`` (or ``--pairs``) valid HH-RLHF harmless pairs of
``../shared/data`` (synthetic pairs when the file is absent), written once and read by every run. One line is
printed per run; the last line is one JSON object: ``fpo_vs_dpo_peak_memory``, ``fpo_vs_tdpo_peak_memory``,
``fpo_vs_simpo_peak_memory``, ``fpo_vs_simpo_step_time`` (full fine-tuning), the same under ``lora_*``,
``targets``, ``pass`` and ``all_pass`` (full fine-tuning: FPO <= 1.05x SimPO's memory, <= 0.85x DPO's, <= 0.83x
TDPO-2's, step time <= 1.1x SimPO's; LoRA's ratios against the same bounds under ``lora_pass_informational``:
with LoRA the reference is no copy of the weights, so there is nothing for the cache to save), each run's raw
numbers (with the machine's 1-minute load average before and after it), the CPU and torch's thread count. ``--repeats N`` runs every method N times, interleaved, and takes each one's median.

Sizing: the default (embedded model, fp32 on CPU, 6 steps of 4 pairs in one forward each, 192 tokens, 8 runs)
took 2.0-3.0 minutes a run at load ~2 (2026-12-01, full fine-tuning; Ray's start, the model load, FPO's cache
pass and the checkpoint included). Four pairs a forward, not two: TDPO-2's cost is its per-token distributions,
which grow with the tokens of a forward, and at two pairs a forward every full fine-tuning peak is the optimizer
step (TDPO-2 measured as DPO, 3027 against 3013 MB). Step times on a shared machine follow its load; peak memory
barely moves (a few percent between runs). ``--model tiny`` numbers say nothing about the methods: the tiny
model's weights are a few MB, so
constants (libraries imported after the baseline) dominate.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.fpo_memory_runs import METHODS, run_method, shared_inputs  # noqa: E402
from benchmarks.machine import cpu_info  # noqa: E402

FINETUNE = ("full", "lora")
# ratio name -> (FPO against, measure, upper bound)
TARGETS = {"fpo_vs_simpo_peak_memory": ("simpo", "peak_mb", 1.05),
           "fpo_vs_dpo_peak_memory": ("dpo", "peak_mb", 0.85),
           "fpo_vs_tdpo_peak_memory": ("tdpo2", "peak_mb", 0.83),
           "fpo_vs_simpo_step_time": ("simpo", "seconds_per_step", 1.1)}
# reported beside the targets: CPU seconds per step (all the worker's threads) move far less with the machine's
# load than wall seconds do
INFO_RATIOS = {"fpo_vs_simpo_step_cpu_time": ("simpo", "cpu_seconds_per_step")}
MEASURED = ("peak_rss_mb_above_baseline", "peak_gpu_mb", "seconds_per_step", "cpu_seconds_per_step")


def _csv(choices):
    def parse(s: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in s.split(",") if x.strip())
        bad = [x for x in items if x not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(choices)}, got {s!r}")
        return items
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="FPO's training memory and step time against DPO, TDPO-2 and SimPO, "
                                             "in full fine-tuning and LoRA (see the module docstring)")
    ap.add_argument("--model", default="embedded",
                    help="embedded (SmolLM2-135M-Instruct), tiny (a random 4x64 Llama built here), random:HIDDENxBLOCKS "
                         "(a random Llama of that width and depth built here, ~400-token vocabulary: its weights "
                         "dominate the peak), or any model.name")
    ap.add_argument("--finetune", type=_csv(FINETUNE), default=FINETUNE, help="full,lora")
    ap.add_argument("--methods", type=_csv(METHODS), default=METHODS, help="dpo,tdpo2,simpo,fpo")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run (one epoch)")
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=4, help="pairs per forward")
    ap.add_argument("--pairs", type=int, default=None,
                    help="pairs per run (default steps x batch-size; sets the steps)")
    ap.add_argument("--max-tokens", type=int, default=192, help="token budget of prompt + response")
    ap.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=0,
                    help="align.train.deepspeed_stage (0: one worker has nothing to shard, and ZeRO-1/2 keep an fp32 "
                         "partition copy of the weights beside them, a sixth weight-sized tensor in fp32 training)")
    ap.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                    help="keep every block's activations (default: align.train.gradient_checkpointing=true)")
    ap.add_argument("--lr", type=float, default=1e-5, help="every run's learning rate (nothing measured depends on it)")
    ap.add_argument("--sae-dir", default=None, help="FPO's SAE folder (default: a random SAE shaped for the model)")
    ap.add_argument("--sae-width", type=int, default=4096, help="latents of the random SAE")
    ap.add_argument("--layer", type=int, default=None, help="FPO's SAE block (default: half the model's blocks)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: the trainer on a GPU where CUDA is present")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=65536,
                    help="glibc's mmap threshold in bytes for every run's processes, so peak RSS counts live memory "
                         "(see fpo_memory_runs.run_env); 0: glibc's default, which keeps freed tensors")
    ap.add_argument("--ray-cpus", type=int, default=2, help="num_cpus of each run's ray.init")
    ap.add_argument("--torch-threads", type=int, default=0, help="align.train.torch_threads (0: the trainer's rule)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each method, interleaved; ratios use each method's median")
    ap.add_argument("--retries", type=int, default=1, help="new tries of a run whose process failed (e.g. Ray's start)")
    ap.add_argument("--run-timeout", type=float, default=1200, help="seconds before a run's process is stopped")
    ap.add_argument("--work-dir", default=None, help="keep pairs, SAE, logs and results here (default: a temp dir)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a further config override for every run (repeatable)")
    args = ap.parse_args(argv)
    if min(args.steps, args.batch_size, args.micro_batch, args.repeats) < 1:
        ap.error("--steps, --batch-size, --micro-batch and --repeats must be >= 1")
    if args.retries < 0:
        ap.error("--retries must be >= 0")
    if args.batch_size % args.micro_batch:
        ap.error(f"--batch-size {args.batch_size} must be a multiple of --micro-batch {args.micro_batch}")
    if args.pairs is not None:
        if args.pairs < 1:
            ap.error("--pairs must be >= 1")
        args.steps = -(-args.pairs // args.batch_size)
    else:
        args.pairs = args.steps * args.batch_size
    if args.max_tokens < 16:
        ap.error("--max-tokens must be >= 16")
    return args


# ---------------------------------------------------------------- summary (pure: tested on fake rows)

def peak_mb(row: dict, use_gpu: bool) -> float | None:
    """The peak memory a run is compared by: device memory on a GPU, RSS above the baseline on CPU."""
    v = row.get("peak_gpu_mb") if use_gpu else row.get("peak_rss_mb_above_baseline")
    return None if v is None else float(v)


def _ratio(a, b) -> float | None:
    return None if a is None or b is None or b <= 0 else round(a / b, 4)


def _median(xs: list[float]) -> float | None:
    xs = sorted(xs)
    n = len(xs)
    return None if not n else (xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2)


def _measure(run: dict, measure: str, use_gpu: bool) -> float | None:
    row = run.get("row") or {}
    if measure == "peak_mb":
        return peak_mb(row, use_gpu)
    v = row.get(measure)
    return None if v is None else float(v)


def medians(runs: list[dict], use_gpu: bool) -> dict:
    """Per (finetune, method): the median of each measure over its runs (repeats) that have it, and the count."""
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["finetune"], r["method"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        vals = {m: [v for v in (_measure(r, m, use_gpu) for r in rs) if v is not None]
                for m in ("peak_mb", "seconds_per_step", "cpu_seconds_per_step")}
        out[key] = {**{m: _median(v) for m, v in vals.items()}, "runs": len(rs),
                    "runs_measured": min(len(vals[m]) for m in ("peak_mb", "seconds_per_step"))}
    return out


def summarize(runs: list[dict], use_gpu: bool) -> dict:
    """Ratios, targets and pass/fail from the runs (each {"finetune", "method", "row": first history row,
    ...}; several of one method (``--repeats``) are taken at their median). Full fine-tuning's ratios go under
    the plain names, LoRA's under ``lora_*``; a ratio whose runs or fields are missing is None, so is its pass."""
    med = medians(runs, use_gpu)
    out: dict = {}
    passes: dict = {"full": {}, "lora": {}}
    for finetune, prefix in (("full", ""), ("lora", "lora_")):
        fpo = med.get((finetune, "fpo"))
        for name, (other, measure, bound) in TARGETS.items():
            base = med.get((finetune, other))
            value = None
            if fpo is not None and base is not None:
                value = _ratio(fpo[measure], base[measure])
            out[prefix + name] = value
            passes[finetune][prefix + name] = None if value is None else bool(value <= bound)
        for name, (other, measure) in INFO_RATIOS.items():
            base = med.get((finetune, other))
            out[prefix + name] = _ratio(fpo[measure], base[measure]) if fpo and base else None
    decided = [v for v in passes["full"].values() if v is not None]
    out["targets"] = {name: {"max": bound, "fpo_against": other, "measure": measure}
                      for name, (other, measure, bound) in TARGETS.items()}
    # the targets are full fine-tuning's: there DPO's and TDPO-2's reference is a copy of the weights, the memory
    # the cache saves. With LoRA the reference is the policy with its adapter off (no copy), so FPO's SAE and cache
    # rows are all it adds to SimPO's or DPO's peak; LoRA's ratios are held to the same bounds for information only
    out["pass"] = passes["full"]
    out["all_pass"] = bool(decided) and all(decided) and len(decided) == len(passes["full"])
    out["lora_pass_informational"] = passes["lora"]
    out["memory_metric"] = "peak_gpu_mb" if use_gpu else "peak_rss_mb_above_baseline"
    out["medians"] = {f"{f}_{m}": v for (f, m), v in med.items()}
    missing = sorted({f for r in runs if r.get("row") is not None for f in MEASURED if f not in r["row"]})
    out["history_fields_missing"] = missing
    out["checks"] = method_checks(runs)
    return out


def method_checks(runs: list[dict]) -> dict:
    """Whether each method ran its reference as the comparison means (None: a run or a field is absent; False
    if any of its runs did not): DPO and TDPO-2 with a reference forward at every micro-batch, and in full
    fine-tuning through a frozen copy of the weights (with LoRA the trainer runs it through the policy's
    weights with the adapter off, as TRL does with peft); SimPO and FPO with neither a copy nor a reference
    forward during the steps."""
    found: dict = {}
    for r in runs:
        row, key = r.get("row"), f"{r['finetune']}_{r['method']}"
        ok = None
        if row is not None:
            copy, ref_steps, micro = (row.get(k) for k in ("reference_copy", "reference_forwards_in_steps",
                                                           "policy_micro_batches"))
            if copy is not None and ref_steps is not None:
                if r["method"] in ("dpo", "tdpo2"):
                    ok = bool(ref_steps > 0 and (micro is None or ref_steps == micro)
                              and (copy or r["finetune"] != "full"))
                else:
                    ok = bool(not copy and ref_steps == 0)
        found.setdefault(key, []).append(ok)
    return {k: False if False in v else (None if None in v else True) for k, v in found.items()}


def run_line(run: dict, use_gpu: bool) -> str:
    row = run.get("row")
    head = f"{run['finetune']:<4} {run['method']:<5}" + (f" #{run['repeat']}" if "repeat" in run else "")
    if row is None:
        return f"{head} FAILED ({run.get('error', 'no result')}), wall {run.get('wall_s', 0):.1f} s"

    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    mem = peak_mb(row, use_gpu)
    return (f"{head} peak {fmt(mem, '.1f')} MB  {fmt(row.get('seconds_per_step'), '.3f')} s/step  "
            f"{fmt(row.get('cpu_seconds_per_step'), '.3f')} CPU s/step  "
            f"steps {row.get('global_step')}  reference_copy={row.get('reference_copy')} "
            f"reference_forwards_in_steps={row.get('reference_forwards_in_steps')} "
            f"model_forwards_in_steps={row.get('model_forwards_in_steps')}  wall {run.get('wall_s', 0):.1f} s  "
            f"load {run.get('loadavg_1min_before')}->{run.get('loadavg_1min_after')}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    use_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    tmp = None
    if args.work_dir:
        work = Path(args.work_dir).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="fpo-memory-")
        work = Path(tmp.name)
    try:
        inputs = shared_inputs(args, work)
        print(f"model {args.model} (hidden {inputs.hidden}, {inputs.blocks} blocks), {inputs.n_pairs} pairs from "
              f"{inputs.pairs_source}, {args.steps} steps of {args.batch_size} pairs (micro-batch {args.micro_batch}), "
              f"max tokens {args.max_tokens}, SAE "
              f"{'random ' + str(args.sae_width) + ' latents' if not args.sae_dir else inputs.sae_dir} at block "
              f"{inputs.layer}, {'GPU' if use_gpu else 'CPU'}; setup {inputs.setup_s:.1f} s", flush=True)

        runs = []
        for repeat in range(args.repeats):  # interleaved: a change in the machine's load spreads over methods
            for finetune in args.finetune:
                for method in args.methods:
                    runs.append(run_method(args, inputs, work, finetune, method, repeat, use_gpu))
                    print(run_line(runs[-1], use_gpu), flush=True)

        result = summarize(runs, use_gpu)
        threads = next((r.get("torch_threads") for r in runs if r.get("torch_threads")), None)
        result.update({
            "model": args.model, "hidden_size": inputs.hidden, "blocks": inputs.blocks, "pairs": inputs.n_pairs,
            "pairs_source": inputs.pairs_source, "steps": args.steps, "batch_size": args.batch_size,
            "micro_batch": args.micro_batch, "max_tokens": args.max_tokens, "lr": args.lr,
            "sae": {"dir": args.sae_dir, "width": args.sae_width if not args.sae_dir else None, "layer": inputs.layer},
            "device": "cuda" if use_gpu else "cpu",
            "gpu": torch.cuda.get_device_name(0) if use_gpu else None,
            "cpu": cpu_info(), "torch_threads": threads, "torch": torch.__version__,
            "malloc_mmap_threshold": args.malloc_mmap_threshold or None, "repeats": args.repeats,
            "runs": {f"{r['finetune']}_{r['method']}" + (f"_r{r['repeat']}" if "repeat" in r else ""):
                     {"peak_mb": peak_mb(r.get("row") or {}, use_gpu),
                      **{k: v for k, v in r.items() if k not in ("finetune", "method")}} for r in runs},
            "total_wall_s": round(sum(r.get("process_wall_s", r.get("wall_s", 0)) for r in runs), 1),
        })
        print(json.dumps(result), flush=True)
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
