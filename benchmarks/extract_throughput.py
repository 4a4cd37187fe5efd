"""Feature-extraction throughput: the Ray Data pipeline against a naive loop, and against the machine's own
best matmul rate over the model's GEMM shapes, in the model's dtype (fp32 unless ``--dtype``; both sides
always run in the same dtype). All measured in this one run, on the same pairs.

tokens/s counts every token of both texts of each pair (so work saved by prefix sharing shows as speed).
Naive loop: the full model with its LM head, ``output_hidden_states=True``, batch 1, chosen and rejected
as separate texts. Achieved FLOP/s: FLOPs counted from the model's shapes over the tokens the pipeline
actually computed, divided by the pipeline's wall time (Ray start excluded, actor start and model load
included).

    python benchmarks/extract_throughput.py [--pairs 200] [--max-tokens 256] [--dtype float32]
                                            [--config jobs/configs/quickstart.yaml]

``flop_ratio`` is the naive loop's FLOPs over the pipeline's (the speedup at equal FLOP/s); ``naive_gflops``
is the naive loop's own rate, so speedup_vs_naive = flop_ratio x pipeline_gflops / naive_gflops.

The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparserm.config import load_config, replace  # noqa: E402
from sparserm.features.stage import prepare_data  # noqa: E402
from sparserm.model.backbone import load_causal_lm  # noqa: E402
from sparserm.model.text import encode_group  # noqa: E402


def gemm_shapes(cfg, m: int) -> list[tuple[int, int, int]]:
    d, f = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    return [(m, d, d), (m, d, kv), (m, d, f), (m, f, d)]


def flops_per_token(cfg, n_layers: int, context: float) -> float:
    """Multiply-adds x 2 of one token through ``n_layers`` blocks, attention over ``context`` keys."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    dense = 2 * (d * d * 2 + d * kv * 2 + 3 * d * f)  # q, o; k, v; gate, up, down
    attn = 2 * 2 * context * d  # scores and weighted sum
    return n_layers * (dense + attn)


def best_matmul_flops(shapes: list[tuple[int, int, int]], dtype: torch.dtype = torch.float32,
                      seconds: float = 1.0) -> tuple[float, list]:
    best, table = 0.0, []
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(3):
            a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
        rate = 2 * m * k * n * reps / (time.perf_counter() - t0)
        table.append({"shape": [m, k, n], "gflops": round(rate / 1e9, 2)})
        best = max(best, rate)
    return best, table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="jobs/configs/quickstart.yaml")
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    cfg = load_config(args.config, [f"model.max_tokens={args.max_tokens}", f"model.dtype={args.dtype}"])
    rows = [r for r in prepare_data(cfg).rows if r["source"].startswith("hh")][: args.pairs]
    for r in rows:
        r["split"] = "train"

    model, tok = load_causal_lm(cfg.model, cfg.run.cache_dir)
    groups = [encode_group(tok, r["prompt"], [r["chosen"], r["rejected"]], args.max_tokens) for r in rows]
    n_total = sum(g.n_tokens_total for g in groups)
    n_shared = sum(g.n_tokens_shared for g in groups)

    # naive loop
    t0 = time.perf_counter()
    with torch.inference_mode():
        for g in groups:
            for i in range(2):
                model(input_ids=torch.tensor([g.sequence(i)]), output_hidden_states=True)
    naive_s = time.perf_counter() - t0
    mcfg = model.config
    del model

    # the Ray Data pipeline
    import ray

    from sparserm.features.extract import extract_to_shards

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        extract_to_shards(rows, tmp, cfg.model, replace(cfg.features, share_prefix=True), cfg.run.cache_dir, 0)
        pipe_s = time.perf_counter() - t0
    ray.shutdown()

    n_layers = max(cfg.model.layers) + 1
    mean_ctx = sum(len(g.prefix) + len(s) for g in groups for s in g.suffixes) / (2 * len(groups)) / 2
    pipe_flops = n_shared * flops_per_token(mcfg, n_layers, mean_ctx)
    mean_len = int(n_shared / (3 * len(groups)))
    # the model's GEMMs at batch 1 (mean text length, 256 tokens) and at the packed forward's row count
    best, table = best_matmul_flops(gemm_shapes(mcfg, max(mean_len, 16)) + gemm_shapes(mcfg, 256)
                                    + gemm_shapes(mcfg, cfg.features.max_batch_tokens), getattr(torch, args.dtype))
    mean_text = n_total / (2 * len(groups))
    naive_flops = n_total * (flops_per_token(mcfg, mcfg.num_hidden_layers, mean_text / 2)
                             + 2 * mcfg.hidden_size * mcfg.vocab_size)
    result = {
        "pairs": len(rows), "dtype": args.dtype, "tokens_both_texts": n_total, "tokens_computed_shared": n_shared,
        "naive_tokens_per_s": round(n_total / naive_s, 1), "pipeline_tokens_per_s": round(n_total / pipe_s, 1),
        "naive_seconds": round(naive_s, 1), "pipeline_seconds": round(pipe_s, 1),
        "speedup_vs_naive": round(naive_s / pipe_s, 2),
        "pipeline_gflops": round(pipe_flops / pipe_s / 1e9, 2), "best_matmul_gflops": round(best / 1e9, 2),
        "flops_fraction": round(pipe_flops / pipe_s / best, 3),
        "naive_gflops": round(naive_flops / naive_s / 1e9, 2), "flop_ratio": round(naive_flops / pipe_flops, 2),
        "matmul_shapes": table,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
