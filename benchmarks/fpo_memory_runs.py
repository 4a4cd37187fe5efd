"""One run of ``benchmarks/fpo_memory.py``: the inputs every run shares (model, SAE, pairs), each run's config
overrides and spec, its fresh process (``launch``, with retries) and, in that process (this file run as a script
on the spec file), the training and the measurement (``child``).

The methods, as the FPO paper compares them:

  every step, as TRL runs it; in full fine-tuning through a frozen copy of the weights beside the policy, with
  LoRA through the policy's weights with the adapter off (the trainer's choice, as TRL's with peft);
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
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("dpo", "tdpo2", "simpo", "fpo")
# copied from each run's first history row
ROW_FIELDS = ("peak_rss_mb_above_baseline", "peak_gpu_mb", "seconds_per_step", "cpu_seconds_per_step", "reference_copy",
              "reference_forwards_in_steps", "model_forwards_in_steps", "policy_micro_batches", "reference_kind",
              "reference_forwards", "objective", "finetune", "dtype", "global_step", "loss", "n_pairs", "torch_threads")
METHOD_OVERRIDES = {"dpo": ["align.loss.name=dpo", "align.train.reference_online=true"],
                    "tdpo2": ["align.loss.name=tdpo2"], "simpo": ["align.loss.name=simpo"],
                    "fpo": ["align.loss.name=fpo"]}
HH = ROOT.parent / "shared" / "data" / "hh_rlhf_harmless.jsonl.gz"


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
           f"align.reference_cache.batch_size={max(args.micro_batch, 2)}",
           f"align.train.deepspeed_stage={args.zero_stage}",
           f"align.train.gradient_checkpointing={str(args.gradient_checkpointing).lower()}"]
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


def random_shape(model: str) -> tuple[int, int]:
    """(hidden size, blocks) of ``tiny`` (64, 4) or ``random:HIDDENxBLOCKS``."""
    if model == "tiny":
        return 64, 4
    try:
        hidden, blocks = (int(x) for x in model.split(":", 1)[1].lower().split("x"))
    except ValueError:
        raise ValueError(f"--model {model!r}: expected random:HIDDENxBLOCKS, e.g. random:1024x8") from None
    if hidden < 8 or hidden % 4 or blocks < 1:
        raise ValueError(f"--model {model!r}: HIDDEN must be a multiple of 4 (>= 8) and BLOCKS >= 1")
    return hidden, blocks


def model_shape(model_name: str, cache_dir: str | None) -> tuple[int, int]:
    """(hidden size, number of blocks) from the model's config (the embedded model is converted once)."""
    from transformers import AutoConfig

    from sparserm.config import ModelConfig, default_cache_dir
    from sparserm.model.backbone import resolve_source

    source, kwargs = resolve_source(ModelConfig(name=model_name), cache_dir or default_cache_dir())
    c = AutoConfig.from_pretrained(source, **kwargs)
    return int(c.hidden_size), int(c.num_hidden_layers)


def shared_inputs(args, work: Path) -> SimpleNamespace:
    """Made once for every run: the model (``tiny``: built here, with a cache of its own), its shape, FPO's SAE
    (a random one unless ``--sae-dir``) and its block, and the pairs file."""
    cache_dir, model_name = None, args.model
    if args.model == "tiny" or args.model.startswith("random:"):
        from sparserm.testing import build_tiny_model

        hidden, blocks = random_shape(args.model)
        model_name = str(build_tiny_model(work / "tiny-model", n_layers=blocks, hidden=hidden))
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
    return SimpleNamespace(model_name=model_name, cache_dir=cache_dir, hidden=hidden, blocks=n_layers, layer=layer,
                           sae_dir=sae_dir, n_pairs=len(pairs), pairs_source=pairs_source, pairs_file=pairs_file,
                           setup_s=time.perf_counter() - t0)


# ---------------------------------------------------------------- one run (the child process)

def child(spec_file: str) -> None:
    """Train one method from its spec file and write what it measured to the spec's result file."""
    import ray
    import torch

    from sparserm.align.trainer import train_dpo
    from sparserm.config import load_config

    spec = json.loads(Path(spec_file).read_text())
    cfg = load_config(None, spec["overrides"])
    pairs = json.loads(Path(spec["pairs"]).read_text())
    ray.init(address="local", num_cpus=spec["ray_cpus"], include_dashboard=False, log_to_driver=False)
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
           "torch_threads": row.get("torch_threads") or t.torch_threads
           or (os.cpu_count() if t.num_gpus == 0 else None),
           "driver_torch_threads": torch.get_num_threads()}
    manifest = Path(spec["storage"], spec["name"], "reference_cache", "manifest.json")
    if manifest.is_file():  # FPO's offline pass (before training, so in neither peak nor step time)
        out["reference_cache_seconds"] = json.loads(manifest.read_text()).get("seconds")
    Path(spec["result"]).write_text(json.dumps(out))


def run_env(mmap_threshold: int) -> dict:
    """The environment of a run's process (and so of the Ray it starts, raylet and workers included).

    ``mmap_threshold`` > 0 fixes glibc's mmap threshold (``MALLOC_MMAP_THRESHOLD_``) at that many bytes: every
    larger allocation, every tensor that matters, is its own mapping and goes back to the OS when freed. By
    default glibc raises the threshold as large blocks are freed and then keeps freed tensors in its heap, so
    peak RSS also counts memory the process no longer uses, in amounts that depend on the order of frees. With
    the threshold fixed, peak RSS counts live memory, as peak allocated memory does on a GPU."""
    env = dict(os.environ)
    if mmap_threshold > 0:
        env["MALLOC_MMAP_THRESHOLD_"] = str(int(mmap_threshold))
    return env


def launch(spec: dict, work: Path, timeout: float) -> dict:
    """Run one method in a fresh process; its result, or the error and the tail of its log."""
    spec_file = work / f"{spec['name']}.spec.json"
    spec_file.write_text(json.dumps(spec))
    log = work / f"{spec['name']}.log"
    load_before = round(os.getloadavg()[0], 2)  # the machine may be shared: step times move with its load
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(spec_file)],
                                  stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, cwd=str(ROOT),
                                  env=run_env(spec.get("malloc_mmap_threshold", 0)))
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


def run_method(args, inputs: SimpleNamespace, work: Path, finetune: str, method: str, repeat: int,
               use_gpu: bool) -> dict:
    """One method's run (repeat ``repeat``, from 0): its spec, up to ``--retries`` new tries of a failed process,
    and its storage removed after; {"finetune", "method", ["repeat",] the result, "attempts"}."""
    name = f"{finetune}-{method}" + (f"-r{repeat + 1}" if args.repeats > 1 else "")
    spec = {"name": name, "overrides": run_overrides(args, method, finetune, inputs.model_name, inputs.cache_dir,
                                                      inputs.sae_dir, use_gpu),
            "pairs": str(inputs.pairs_file), "storage": str(work / "runs"), "ray_cpus": args.ray_cpus,
            "malloc_mmap_threshold": args.malloc_mmap_threshold,
            "result": str(work / f"{name}.result.json")}
    for attempt in range(1, args.retries + 2):
        shutil.rmtree(work / "runs" / name, ignore_errors=True)  # a failed try starts afresh
        run = {"finetune": finetune, "method": method, **({"repeat": repeat + 1} if args.repeats > 1 else {}),
               **launch(spec, work, args.run_timeout), "attempts": attempt}
        if run.get("row") is not None:
            break
    shutil.rmtree(work / "runs" / name, ignore_errors=True)  # full fine-tuning checkpoints are large
    return run


if __name__ == "__main__":
    child(sys.argv[1])
