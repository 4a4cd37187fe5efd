"""Training memory and step time of FPO against DPO, TDPO-2 and SimPO, in full fine-tuning and LoRA: the real
trainer (``sparserm.align.trainer.train_dpo``: DeepSpeed on Ray Train), the same pairs and steps for every
method, each run in a fresh process of its own (a subprocess of this script that starts its own Ray), so no
run's allocations reach another's peak.

The methods, as the FPO paper compares them:

- ``dpo``: DPO with its reference online (``align.train.reference_online=true``: a frozen reference copy of
  the weights beside the policy, a reference forward at every step, as TRL runs it);
- ``tdpo2``: TDPO-2 (``align.loss.name=tdpo2``), the token-level reference online at every step;
- ``simpo``: SimPO, no reference;
- ``fpo``: FPO with the offline reference cache (``align.loss.name=fpo``): one Ray Data pass of the reference
  before training, then no reference model on the worker. Its SAE is ``--sae-dir``, or by default a random
  sae-lens SAE shaped for the model (``sparserm.testing.build_tiny_sae``: d_in = the model's hidden size,
  ``--sae-width`` latents, block ``--layer``); nothing is trained for it.

What is measured comes from the trainer's first-epoch history row (the run is one epoch): on CPU
``peak_rss_mb_above_baseline`` (the Ray Train worker's peak RSS minus its RSS just before the model loaded;
the FPO cache pass runs before, in other processes, and is not in it), on a GPU ``peak_gpu_mb``
(``torch.cuda.max_memory_allocated`` of the worker), and ``seconds_per_step``; with them the row's
``reference_copy``, ``reference_forwards_in_steps`` and ``model_forwards_in_steps``. A field the trainer does
not write yet is null, and so is every ratio that needs it.

    python benchmarks/fpo_memory.py [--model embedded|tiny|FOLDER] [--finetune full,lora]
                                    [--methods dpo,tdpo2,simpo,fpo] [--steps 6] [--batch-size 2]
                                    [--micro-batch 2] [--pairs N] [--max-tokens 192] [--sae-dir DIR]

Pairs: the first ``steps x batch-size`` (or ``--pairs``) valid HH-RLHF harmless pairs of
``../shared/data`` (synthetic pairs when the file is absent), written once and read by every run. One line is
printed per run; the last line is one JSON object: ``fpo_vs_dpo_peak_memory``, ``fpo_vs_tdpo_peak_memory``,
``fpo_vs_simpo_peak_memory``, ``fpo_vs_simpo_step_time`` (full fine-tuning), the same under ``lora_*``,
``targets`` and ``pass`` (FPO <= 1.05x SimPO's memory, <= 0.85x DPO's, <= 0.83x TDPO-2's, step time <= 1.1x
SimPO's), each run's raw numbers, the CPU and torch's thread count.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("dpo", "tdpo2", "simpo", "fpo")
FINETUNE = ("full", "lora")
# ratio name -> (FPO against, measure, upper bound)
TARGETS = {"fpo_vs_simpo_peak_memory": ("simpo", "peak_mb", 1.05),
           "fpo_vs_dpo_peak_memory": ("dpo", "peak_mb", 0.85),
           "fpo_vs_tdpo_peak_memory": ("tdpo2", "peak_mb", 0.83),
           "fpo_vs_simpo_step_time": ("simpo", "seconds_per_step", 1.1)}
# copied from each run's first history row
ROW_FIELDS = ("peak_rss_mb_above_baseline", "peak_gpu_mb", "seconds_per_step", "reference_copy",
              "reference_forwards_in_steps", "model_forwards_in_steps", "policy_micro_batches", "reference_kind",
              "reference_forwards", "objective", "finetune", "dtype", "global_step", "loss", "n_pairs", "torch_threads")
MEASURED = ("peak_rss_mb_above_baseline", "peak_gpu_mb", "seconds_per_step")
METHOD_OVERRIDES = {"dpo": ["align.loss.name=dpo", "align.train.reference_online=true"],
                    "tdpo2": ["align.loss.name=tdpo2"], "simpo": ["align.loss.name=simpo"],
                    "fpo": ["align.loss.name=fpo"]}
HH = ROOT.parent / "shared" / "data" / "hh_rlhf_harmless.jsonl.gz"


def _csv(choices):
    def parse(s: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in s.split(",") if x.strip())
        bad = [x for x in items if x not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(choices)}, got {s!r}")
        return items
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded",
                    help="embedded (SmolLM2-135M-Instruct), tiny (a random 4x64 Llama built here), or any model.name")
    ap.add_argument("--finetune", type=_csv(FINETUNE), default=FINETUNE, help="full,lora")
    ap.add_argument("--methods", type=_csv(METHODS), default=METHODS, help="dpo,tdpo2,simpo,fpo")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run (one epoch)")
    ap.add_argument("--batch-size", type=int, default=2, help="pairs per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=2, help="pairs per forward")
    ap.add_argument("--pairs", type=int, default=None, help="pairs per run (default steps x batch-size; sets the steps)")
    ap.add_argument("--max-tokens", type=int, default=192, help="token budget of prompt + response")
    ap.add_argument("--lr", type=float, default=1e-5, help="every run's learning rate (nothing measured depends on it)")
    ap.add_argument("--sae-dir", default=None, help="FPO's SAE folder (default: a random SAE shaped for the model)")
    ap.add_argument("--sae-width", type=int, default=4096, help="latents of the random SAE")
    ap.add_argument("--layer", type=int, default=None, help="FPO's SAE block (default: half the model's blocks)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: the trainer on a GPU where CUDA is present")
    ap.add_argument("--ray-cpus", type=int, default=2, help="num_cpus of each run's ray.init")
    ap.add_argument("--torch-threads", type=int, default=0, help="align.train.torch_threads (0: the trainer's rule)")
    ap.add_argument("--run-timeout", type=float, default=1200, help="seconds before a run's process is stopped")
    ap.add_argument("--work-dir", default=None, help="keep pairs, SAE, logs and results here (default: a temp dir)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a further config override for every run (repeatable)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one method from a spec file
    args = ap.parse_args(argv)
    if args.child is None:
        if min(args.steps, args.batch_size, args.micro_batch) < 1:
            ap.error("--steps, --batch-size and --micro-batch must be >= 1")
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


def token_split(max_tokens: int) -> tuple[int, int]:
    """(max_prompt_tokens, max_new_tokens) whose sum is the trainer's budget (only the sum enters training)."""
    new = max(8, max_tokens // 4)
    return max_tokens - new, new


def run_overrides(args, method: str, finetune: str, model_name: str, cache_dir: str | None, sae_dir: str | None,
                  use_gpu: bool) -> list[str]:
    prompt, new = token_split(args.max_tokens)
    out = [f"model.name={model_name}", "align.train.epochs=1", f"align.train.batch_size={args.batch_size}",
           f"align.train.micro_batch_size={args.micro_batch}", f"align.generate.max_prompt_tokens={prompt}",
           f"align.generate.max_new_tokens={new}", f"align.train.finetune={finetune}", f"align.train.lr={args.lr}",
           f"align.reference_cache.batch_size={max(args.micro_batch, 2)}"]
    if cache_dir:
        out.append(f"run.cache_dir={cache_dir}")
    if use_gpu:  # shares, so the cache pass's actor never blocks the worker from starting
        out += ["align.train.num_gpus=0.5", "align.reference_cache.num_gpus=0.5"]
    if args.torch_threads:
        out.append(f"align.train.torch_threads={args.torch_threads}")
    out += METHOD_OVERRIDES[method]
    if method == "fpo":
        out.append(f"align.loss.fpo_sae_dir={sae_dir}")
        if args.layer is not None:
            out.append(f"align.loss.fpo_layer={args.layer}")
    return out + list(args.overrides)


# ---------------------------------------------------------------- summary (pure: tested on fake rows)

def peak_mb(row: dict, use_gpu: bool) -> float | None:
    """The peak memory a run is compared by: device memory on a GPU, RSS above the baseline on CPU."""
    v = row.get("peak_gpu_mb") if use_gpu else row.get("peak_rss_mb_above_baseline")
    return None if v is None else float(v)


def _ratio(a, b) -> float | None:
    return None if a is None or b is None or b <= 0 else round(a / b, 4)


def summarize(runs: list[dict], use_gpu: bool) -> dict:
    """Ratios, targets and pass/fail from the runs (each {"finetune", "method", "row": first history row,
    ...}). Full fine-tuning's ratios go under the plain names, LoRA's under ``lora_*``; a ratio whose runs or
    fields are missing is None and so is its pass."""
    by = {(r["finetune"], r["method"]): r for r in runs}
    out: dict = {}
    passes: dict = {}
    for finetune, prefix in (("full", ""), ("lora", "lora_")):
        fpo = by.get((finetune, "fpo"))
        for name, (other, measure, bound) in TARGETS.items():
            base = by.get((finetune, other))
            value = None
            if fpo is not None and base is not None:
                value = _ratio(_measure(fpo, measure, use_gpu), _measure(base, measure, use_gpu))
            out[prefix + name] = value
            passes[prefix + name] = None if value is None else bool(value <= bound)
    decided = [v for v in passes.values() if v is not None]
    out["targets"] = {name: {"max": bound, "fpo_against": other, "measure": measure}
                      for name, (other, measure, bound) in TARGETS.items()}
    out["pass"] = passes
    out["all_pass"] = bool(decided) and all(decided) and len(decided) == len(passes)
    out["memory_metric"] = "peak_gpu_mb" if use_gpu else "peak_rss_mb_above_baseline"
    missing = sorted({f for r in runs if r.get("row") is not None for f in MEASURED if f not in r["row"]})
    out["history_fields_missing"] = missing
    out["checks"] = method_checks(runs)
    return out


def _measure(run: dict, measure: str, use_gpu: bool) -> float | None:
    row = run.get("row") or {}
    if measure == "peak_mb":
        return peak_mb(row, use_gpu)
    v = row.get(measure)
    return None if v is None else float(v)


def method_checks(runs: list[dict]) -> dict:
    """Whether each run ran its reference as the comparison means (None: the run or a field is absent): DPO and
    TDPO-2 with a reference forward at every micro-batch, and in full fine-tuning through a frozen copy of the
    weights (with LoRA the trainer runs it through the policy's weights with the adapter off, as TRL does with
    peft); SimPO and FPO with neither a copy nor a reference forward during the steps."""
    out = {}
    for r in runs:
        row, key = r.get("row"), f"{r['finetune']}_{r['method']}"
        if row is None:
            out[key] = None
            continue
        copy, ref_steps, micro = (row.get(k) for k in ("reference_copy", "reference_forwards_in_steps",
                                                       "policy_micro_batches"))
        if copy is None or ref_steps is None:
            out[key] = None
        elif r["method"] in ("dpo", "tdpo2"):
            out[key] = bool(ref_steps > 0 and (micro is None or ref_steps == micro)
                            and (copy or r["finetune"] != "full"))
        else:
            out[key] = bool(not copy and ref_steps == 0)
    return out


def run_line(run: dict, use_gpu: bool) -> str:
    row = run.get("row")
    head = f"{run['finetune']:<4} {run['method']:<5}"
    if row is None:
        return f"{head} FAILED ({run.get('error', 'no result')}), wall {run.get('wall_s', 0):.1f} s"

    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    mem = peak_mb(row, use_gpu)
    return (f"{head} peak {fmt(mem, '.1f')} MB  {fmt(row.get('seconds_per_step'), '.3f')} s/step  "
            f"steps {row.get('global_step')}  reference_copy={row.get('reference_copy')} "
            f"reference_forwards_in_steps={row.get('reference_forwards_in_steps')} "
            f"model_forwards_in_steps={row.get('model_forwards_in_steps')}  wall {run.get('wall_s', 0):.1f} s  "
            f"load {run.get('loadavg_1min_before')}->{run.get('loadavg_1min_after')}")


def cpu_info() -> dict:
    name, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name is None:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model_name": name, "cores": os.cpu_count(), "avx2": "avx2" in flags, "avx512": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx": bool({"amx_tile", "amx_bf16"} & flags)}


# ---------------------------------------------------------------- inputs shared by every run

def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    words = ("how do I bake bread mix flour water and yeast then bake it I won't help with that please ask "
             "something else the capital of France is Paris a city in Europe").split()
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choices(words, k=k))  # noqa: E731
    return [{"prompt": say(rng.randint(8, 24)) + "?", "chosen": say(rng.randint(16, 64)) + ".",
             "rejected": say(rng.randint(16, 64)) + "."} for _ in range(n)]


def load_benchmark_pairs(n: int) -> tuple[list[dict], str]:
    if HH.is_file():
        from sparserm.data.loaders import load_pairs

        rows = load_pairs(str(HH), max_pairs=n).rows
        if len(rows) == n:
            return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows], f"{HH.name} (first {n})"
    return synthetic_pairs(n), "synthetic"


def model_shape(model_name: str, cache_dir: str | None) -> tuple[int, int]:
    """(hidden size, number of blocks) from the model's config (the embedded model is converted once)."""
    from transformers import AutoConfig

    from sparserm.config import ModelConfig, default_cache_dir
    from sparserm.model.backbone import resolve_source

    source, kwargs = resolve_source(ModelConfig(name=model_name), cache_dir or default_cache_dir())
    c = AutoConfig.from_pretrained(source, **kwargs)
    return int(c.hidden_size), int(c.num_hidden_layers)


# ---------------------------------------------------------------- one run (the child process)

def child(spec_file: str) -> None:
    import ray
    import torch

    from sparserm.align.trainer import train_dpo
    from sparserm.config import load_config

    spec = json.loads(Path(spec_file).read_text())
    cfg = load_config(None, spec["overrides"])
    pairs = json.loads(Path(spec["pairs"]).read_text())
    ray.init(num_cpus=spec["ray_cpus"], include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    try:
        result = train_dpo(cfg, pairs, storage_dir=Path(spec["storage"]), name=spec["name"], progress=False)
    finally:
        wall = time.perf_counter() - t0
        ray.shutdown()
    row = result["history"][0]
    t = cfg.align.train
    out = {"row": {k: row.get(k) for k in ROW_FIELDS if k in row}, "wall_s": round(wall, 2),
           "history_fields": sorted(row), "finished": result["finished"],
           # the trainer's thread rule on CPU (align.train.torch_threads, else every core)
           "torch_threads": row.get("torch_threads") or t.torch_threads or (os.cpu_count() if t.num_gpus == 0 else None),
           "driver_torch_threads": torch.get_num_threads()}
    manifest = Path(spec["storage"], spec["name"], "reference_cache", "manifest.json")
    if manifest.is_file():  # FPO's offline pass (before training, so in neither peak nor step time)
        out["reference_cache_seconds"] = json.loads(manifest.read_text()).get("seconds")
    Path(spec["result"]).write_text(json.dumps(out))


def launch(spec: dict, work: Path, timeout: float) -> dict:
    """Run one method in a fresh process; its result, or the error and the tail of its log."""
    spec_file = work / f"{spec['name']}.spec.json"
    spec_file.write_text(json.dumps(spec))
    log = work / f"{spec['name']}.log"
    load_before = round(os.getloadavg()[0], 2)  # the machine may be shared: step times move with its load
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_file)],
                                  stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, cwd=str(ROOT))
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    load = {"loadavg_1min_before": load_before, "loadavg_1min_after": round(os.getloadavg()[0], 2)}
    if rc == 0 and Path(spec["result"]).is_file():
        return {**json.loads(Path(spec["result"]).read_text()), "process_wall_s": round(wall, 2), **load}
    tail = log.read_text(errors="replace").strip().splitlines()[-15:]
    print(f"--- {spec['name']} failed (exit {rc}); last lines of {log}:\n" + "\n".join(tail), file=sys.stderr,
          flush=True)
    return {"row": None, "error": f"exit {rc}", "wall_s": round(wall, 2), "log": str(log), **load}


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.child is not None:
        child(args.child)
        return None
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
        cache_dir = None
        model_name = args.model
        if args.model == "tiny":
            from sparserm.testing import build_tiny_model

            model_name = str(build_tiny_model(work / "tiny-model"))
            cache_dir = str(work / "cache")  # the user's cache stays untouched
        t0 = time.perf_counter()
        hidden, n_layers = model_shape(model_name, cache_dir)  # the embedded model converts here, once
        layer = args.layer if args.layer is not None else n_layers // 2
        sae_dir = args.sae_dir
        if "fpo" in args.methods and sae_dir is None:
            from sparserm.testing import build_tiny_sae

            sae_dir = str(build_tiny_sae(work / "sae", d_in=hidden, width=args.sae_width, layer=layer))
        sae_dir = str(Path(sae_dir).resolve()) if sae_dir else None
        pairs, pairs_source = load_benchmark_pairs(args.pairs)
        pairs_file = work / "pairs.json"
        pairs_file.write_text(json.dumps(pairs))
        print(f"model {args.model} (hidden {hidden}, {n_layers} blocks), {len(pairs)} pairs from {pairs_source}, "
              f"{args.steps} steps of {args.batch_size} pairs (micro-batch {args.micro_batch}), max tokens "
              f"{args.max_tokens}, SAE {'random ' + str(args.sae_width) + ' latents' if not args.sae_dir else sae_dir}"
              f" at block {layer}, {'GPU' if use_gpu else 'CPU'}; setup {time.perf_counter() - t0:.1f} s", flush=True)

        runs = []
        for finetune in args.finetune:
            for method in args.methods:
                name = f"{finetune}-{method}"
                spec = {"name": name, "overrides": run_overrides(args, method, finetune, model_name, cache_dir,
                                                                  sae_dir, use_gpu),
                        "pairs": str(pairs_file), "storage": str(work / "runs"), "ray_cpus": args.ray_cpus,
                        "result": str(work / f"{name}.result.json")}
                run = {"finetune": finetune, "method": method, **launch(spec, work, args.run_timeout)}
                shutil.rmtree(work / "runs" / name, ignore_errors=True)  # full fine-tuning checkpoints are large
                runs.append(run)
                print(run_line(run, use_gpu), flush=True)

        result = summarize(runs, use_gpu)
        threads = next((r.get("torch_threads") for r in runs if r.get("torch_threads")), None)
        result.update({
            "model": args.model, "hidden_size": hidden, "blocks": n_layers, "pairs": len(pairs),
            "pairs_source": pairs_source, "steps": args.steps, "batch_size": args.batch_size,
            "micro_batch": args.micro_batch, "max_tokens": args.max_tokens, "lr": args.lr,
            "sae": {"dir": args.sae_dir, "width": args.sae_width if not args.sae_dir else None, "layer": layer},
            "device": "cuda" if use_gpu else "cpu",
            "gpu": torch.cuda.get_device_name(0) if use_gpu else None,
            "cpu": cpu_info(), "torch_threads": threads, "torch": torch.__version__,
            "runs": {f"{r['finetune']}_{r['method']}": {"peak_mb": peak_mb(r.get("row") or {}, use_gpu),
                                                          **{k: v for k, v in r.items() if k not in ("finetune", "method")}}
                     for r in runs},
            "total_wall_s": round(sum(r.get("process_wall_s", r.get("wall_s", 0)) for r in runs), 1),
        })
        print(json.dumps(result), flush=True)
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
