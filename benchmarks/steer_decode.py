"""Decode throughput of steered generation against unsteered: the same prompts, the same engine (transformers
generation through ``SteeredGenerator``, the path ``sparserm serve steer`` runs), batch 1 and batch 16, one run.

    python benchmarks/steer_decode.py [--map-dir DIR] [--config jobs/configs/steer-quickstart.yaml]
                                      [--batch-sizes 1,16] [--new-tokens 32] [--repeats 3] [--sae-width 4096]

Steered: every row steered by its own prompt's vector (the map's settings: gate, ``k_diff`` latents, alpha).
Unsteered: the same generator with steering off for every row, as a request with ``steering.enabled=false`` is
served (the edit hook sees no steered row and returns at once). Greedy decoding, ``--new-tokens`` a row.

tokens/s = (rows x forwards run) / wall seconds of the whole ``generate`` call, prompt forward included: the token
slots the engine decoded, so a steered row that ends earlier than its unsteered twin does not count as a slowdown
(``own_tokens`` reports the tokens the rows kept). Each (batch size, variant) runs once to warm up, then
``--repeats`` times interleaved with the other variant; the median is kept.

The map: ``--map-dir`` (one ``sparserm steer build`` wrote), else one built here with the real pipeline
(``steering.build.build_map``, a Ray Data pass over ``--triples`` triples of the config's ``steer.data``) from
random SAEs of ``--sae-width`` latents at the config's steer layers: the edit's cost (encode and decode of the
output SAE at each position) does not depend on what the SAE learnt, only on its width.

The last line is one JSON object with ``steered_vs_plain_tokens_per_s`` (the smaller ratio over batch sizes),
per batch size both rates and their ratio, target >= 0.9, the CPU or GPU and torch's threads.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET = 0.9


def build_random_map(config: str, work: Path, width: int, n_triples: int, overrides: list[str]) -> Path:
    """A map from the embedded pipeline and random SAEs of ``width`` at the config's steer layers."""
    import ray

    from transformers import AutoConfig

    from sparserm.config import load_config
    from sparserm.model.backbone import resolve_source
    from sparserm.steering.build import build_map
    from sparserm.testing import build_tiny_sae

    cfg = load_config(config, overrides)
    source, kwargs = resolve_source(cfg.model, cfg.run.cache_dir)
    d = AutoConfig.from_pretrained(source, **kwargs).hidden_size  # the SAEs' width in; no weights loaded
    s = cfg.steer
    saes = [build_tiny_sae(work / side, d_in=d, width=width, layer=layer, seed=i)
            for i, (side, layer) in enumerate((("input", s.input_layer), ("output", s.output_layer)))]
    cfg = load_config(config, [*overrides, f"steer.input_sae_dir={saes[0]}", f"steer.output_sae_dir={saes[1]}",
                               f"steer.max_triples={n_triples}"])
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    return build_map(cfg, work / "map", progress=False)


def timed_generate(gen, convs, steering, sampling) -> dict:
    t0 = time.perf_counter()
    outs = gen.generate(convs, steering=steering, sampling=sampling, seed=0)
    wall = time.perf_counter() - t0
    forwards = max(o.n_tokens + o.finished for o in outs)  # a row's EOS is sampled by a forward too
    return {"wall_s": wall, "tokens_per_s": len(convs) * forwards / wall, "forwards": forwards,
            "own_tokens": sum(o.n_tokens for o in outs),
            "edited_tokens": sum((o.steering or {}).get("edited_tokens", 0) for o in outs)}


def measure(gen, prompts: list[str], batch: int, sampling, repeats: int) -> dict:
    convs = [[{"role": "user", "content": p}] for p in prompts[:batch]]
    variants = {"plain": [None] * batch, "steered": [gen.settings()] * batch}
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for name, steering in variants.items():  # warm-up
        timed_generate(gen, convs, steering, sampling)
    for _ in range(repeats):
        for name, steering in variants.items():
            runs[name].append(timed_generate(gen, convs, steering, sampling))
    med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in runs.items()}
    return {"plain_tokens_per_s": round(med["plain"], 2), "steered_tokens_per_s": round(med["steered"], 2),
            "steered_vs_plain": round(med["steered"] / med["plain"], 4),
            "forwards": runs["steered"][-1]["forwards"], "own_tokens": {k: v[-1]["own_tokens"] for k, v in runs.items()},
            "edited_tokens_steered": runs["steered"][-1]["edited_tokens"],
            "wall_s": {k: [round(r["wall_s"], 3) for r in v] for k, v in runs.items()}}


def main(argv=None) -> dict:
    from benchmarks.machine import cpu_info
    from sparserm.steering.evaluate import eval_items
    from sparserm.steering.generate import SteeredGenerator

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--map-dir", default=None, help="a steering map folder (default: build one from random SAEs)")
    ap.add_argument("--config", default="jobs/configs/steer-quickstart.yaml")
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sae-width", type=int, default=4096)
    ap.add_argument("--triples", type=int, default=24, help="triples of the map built here")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    if not sizes or min(sizes) < 1 or args.repeats < 1 or args.new_tokens < 1:
        ap.error("--batch-sizes, --repeats and --new-tokens must be positive")
    with tempfile.TemporaryDirectory(prefix="steer-decode-") as tmp:
        map_dir = Path(args.map_dir) if args.map_dir else build_random_map(
            args.config, Path(tmp), args.sae_width, args.triples, args.overrides)
        gen = SteeredGenerator.load(map_dir)
        gen.model.eval()
        prompts = eval_items(gen.map.cfg).prompts  # the held-out prompts steer evaluate reads
        if not prompts:
            raise SystemExit("steer_decode: the map's config gives no held-out prompts")
        prompts = [prompts[i % len(prompts)] for i in range(max(sizes))]  # repeated if fewer than a batch
        sampling = gen.sampling(temperature=0.0, max_new_tokens=args.new_tokens)
        per_batch = {}
        for b in sizes:
            per_batch[str(b)] = measure(gen, prompts, b, sampling, args.repeats)
            print(f"batch {b}: {json.dumps(per_batch[str(b)])}", flush=True)
    ratio = min(r["steered_vs_plain"] for r in per_batch.values())
    device = next(gen.model.parameters()).device
    result = {"steered_vs_plain_tokens_per_s": ratio, "target": TARGET, "pass": ratio >= TARGET,
              "batches": per_batch, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "map": str(args.map_dir) if args.map_dir else f"built here: random SAEs, width {args.sae_width}",
              "layers": [gen.map.input.layer, gen.map.output.layer], "k_diff": gen.map.cfg.steer.k_diff,
              "device": str(device), "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
              "cpu": cpu_info(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
