"""Load test of the reward-model service on loopback (CPU).

1. In-process batched scoring (``SparseRM.score`` in chunks of ``max_batch_size``) of a fixed pool of items,
   before and after step 2 (the ratio is against their mean: the machine may be shared).
2. The same items over HTTP (``POST /v1/score``, ``--items-per-request`` items each, a GRPO-sized group) at
   concurrency 1, 4 and 16 (threads, one keep-alive session each): items/s, p50/p99 request latency.
3. A soak: ``--soak`` requests at concurrency 16, ``--malformed`` of them bad (invalid JSON, missing or
   mistyped fields, too many items, over-long text); counts 5xx (must be 0), checks bad ones got 4xx and
   that every valid request's scores equal the in-process scores (to 1e-5).

The last output line is one JSON object (``throughput_ratio_c16``, ``p99_ms_c16``, per-level numbers, soak).
Usage: ``python benchmarks/serve_load.py [--rm-dir DIR]`` (default: a random RM built in a temp dir over a random
Llama backbone of ``--random-backbone LAYERSxHIDDEN`` blocks, 4x64 as in the tests; 16x576 has SmolLM2-135M's
width and its blocks up to a middle layer, so a model pass costs about what the real backbone's does).
"""
from __future__ import annotations

import argparse
import json
import random
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

WORDS = ("how do I bake bread mix flour water and yeast then bake it I won't help with that please ask "
         "something else the capital of France is Paris a city in Europe tell me a joke why did the chicken "
         "cross road you should wait hours before filing report").split()


def make_items(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    prompts = [" ".join(rng.choices(WORDS, k=rng.randint(4, 16))) + "?" for _ in range(max(1, n // 8))]
    return [(rng.choice(prompts), " " + " ".join(rng.choices(WORDS, k=rng.randint(8, 48)))) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


class Poster:
    """Thread-local keep-alive sessions."""

    def __init__(self, url: str):
        self.url, self.local = url, threading.local()

    def __call__(self, path: str, data: bytes) -> tuple[int, dict | None, float]:
        import requests

        if getattr(self.local, "s", None) is None:
            self.local.s = requests.Session()
        t = time.perf_counter()
        r = self.local.s.post(self.url + path, data=data, headers={"Content-Type": "application/json"}, timeout=120)
        dt = time.perf_counter() - t
        try:
            body = r.json()
        except ValueError:
            body = None
        return r.status_code, body, dt


def run_level(post: Poster, items, per_req: int, concurrency: int, expected: np.ndarray) -> dict:
    chunks = [list(range(i, min(i + per_req, len(items)))) for i in range(0, len(items), per_req)]

    def one(idx):
        body = json.dumps({"items": [{"prompt": items[i][0], "response": items[i][1]} for i in idx]}).encode()
        status, out, dt = post("/v1/score", body)
        ok = status == 200 and np.allclose(out["scores"], expected[idx], atol=1e-5, rtol=0)
        return dt, ok

    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        res = list(pool.map(one, chunks))
    wall = time.perf_counter() - t
    lat = [dt * 1000 for dt, _ in res]
    return {"items_per_s": len(items) / wall, "requests_per_s": len(chunks) / wall, "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99), "requests": len(chunks), "all_equal_in_process": all(ok for _, ok in res)}


def malformed(rng: random.Random, items, max_items: int, max_chars: int) -> bytes:
    p, r = rng.choice(items)
    kind = rng.randrange(6)
    if kind == 0:
        return b'{"items": [{"prompt": "' + p.encode()  # truncated JSON
    if kind == 1:
        return json.dumps({"items": [{"prompt": p}]}).encode()  # missing field
    if kind == 2:
        return json.dumps({"items": [{"prompt": 7, "response": r}]}).encode()  # wrong type
    if kind == 3:
        return json.dumps({"items": [{"prompt": p, "response": r}] * (max_items + 1)}).encode()  # too many
    if kind == 4:
        return json.dumps({"items": [{"prompt": p, "response": "x" * (max_chars + 1)}]}).encode()  # over-long
    return json.dumps({"itemz": []}).encode()  # unknown key


def soak(post: Poster, items, expected: np.ndarray, n: int, bad_share: float, concurrency: int, cfg) -> dict:
    rng = random.Random(1)
    plan, bad = [], set(rng.sample(range(n), round(n * bad_share)))
    for k in range(n):
        if k in bad:
            plan.append((None, malformed(rng, items, cfg.max_items_per_request, cfg.max_text_chars)))
        else:
            idx = rng.sample(range(len(items)), rng.randint(1, 4))
            plan.append((idx, json.dumps({"items": [{"prompt": items[i][0], "response": items[i][1]}
                                                    for i in idx]}).encode()))

    def one(job):
        idx, body = job
        status, out, _ = post("/v1/score", body)
        if idx is None:
            return status, 400 <= status < 500, 0.0
        if status != 200:
            return status, False, float("inf")
        diff = float(np.max(np.abs(np.asarray(out["scores"]) - expected[idx])))
        return status, diff <= 1e-5, diff

    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        res = list(pool.map(one, plan))
    wall = time.perf_counter() - t
    n_bad = sum(idx is None for idx, _ in plan)
    return {"requests": n, "malformed": n_bad, "status_5xx": sum(s >= 500 for s, _, _ in res),
            "malformed_not_4xx": sum(not ok for (idx, _), (_, ok, _) in zip(plan, res) if idx is None),
            "valid_wrong_or_failed": sum(not ok for (idx, _), (_, ok, _) in zip(plan, res) if idx is not None),
            "max_abs_diff": max([d for (idx, _), (_, _, d) in zip(plan, res) if idx is not None], default=0.0),
            "wall_s": wall}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rm-dir", default=None)
    ap.add_argument("--random-backbone", default="4x64", help="LAYERSxHIDDEN of the random RM (without --rm-dir)")
    ap.add_argument("--items", type=int, default=1536, help="items per concurrency level")
    ap.add_argument("--items-per-request", type=int, default=8)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--soak", type=int, default=5000)
    ap.add_argument("--malformed", type=float, default=0.05)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--num-cpus", type=float, default=1.0, help="CPUs (and torch threads) per replica")
    args = ap.parse_args(argv)

    import ray
    import torch
    from ray import serve

    from sparserm.reward.model import SparseRM
    from sparserm.serve.app import build_app
    from sparserm.serve.config import ServeConfig
    from sparserm.testing import build_tiny_rm

    tmp = tempfile.TemporaryDirectory()
    if args.rm_dir:
        rm_dir = Path(args.rm_dir)
    else:
        n_layers, hidden = (int(x) for x in args.random_backbone.lower().split("x"))
        rm_dir = build_tiny_rm(Path(tmp.name) / "rm", layer=min(2, n_layers - 1) if n_layers <= 4 else n_layers - 1,
                               n_layers=n_layers, hidden=hidden)
    cfg = ServeConfig(port=free_port(), replicas=args.replicas, num_cpus=args.num_cpus)
    items = make_items(args.items)

    # 1. in-process batched scoring, same thread count as one replica (again after the HTTP levels: the machine
    #    may be shared, so the ratio is taken against the mean of the two runs)
    torch.set_num_threads(max(1, int(round(args.num_cpus))))
    rm = SparseRM.load(rm_dir)
    rm.score(*map(list, zip(*items[:16])))  # warm-up

    def in_process() -> tuple[float, np.ndarray]:
        t, scores = time.perf_counter(), []
        for i in range(0, len(items), cfg.max_batch_size):
            chunk = items[i: i + cfg.max_batch_size]
            scores += rm.score([p for p, _ in chunk], [r for _, r in chunk])
        return len(items) / (time.perf_counter() - t), np.asarray(scores)

    inproc_runs = [0.0]
    inproc_runs[0], expected = in_process()
    print(f"in-process: {inproc_runs[0]:.1f} items/s (torch threads {torch.get_num_threads()})", flush=True)

    # 2. HTTP at each concurrency
    ray.init(address="local", num_cpus=max(2, int(args.replicas * args.num_cpus) + 1), include_dashboard=False,
             log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.port})
    serve.run(build_app(rm_dir, cfg, token=None), name="sparserm-bench", route_prefix="/")
    post = Poster(f"http://127.0.0.1:{cfg.port}")
    run_level(post, items[:64], args.items_per_request, 4, expected[:64])  # warm-up
    levels = {}
    for c in [int(x) for x in args.concurrency.split(",")]:
        levels[c] = run_level(post, items, args.items_per_request, c, expected)
        print(f"c={c}: " + json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in levels[c].items()}),
              flush=True)

    inproc_runs.append(in_process()[0])
    inproc = float(np.mean(inproc_runs))
    print(f"in-process again: {inproc_runs[1]:.1f} items/s; mean {inproc:.1f}", flush=True)

    # 3. soak
    soaked = soak(post, items, expected, args.soak, args.malformed, 16, cfg)
    print("soak: " + json.dumps(soaked), flush=True)
    serve.shutdown()
    ray.shutdown()

    top = max(levels)
    result = {"throughput_ratio_c16": levels[top]["items_per_s"] / inproc, "p99_ms_c16": levels[top]["p99_ms"],
              "p50_ms_c16": levels[top]["p50_ms"], "inprocess_items_per_s": inproc, "inprocess_runs": inproc_runs,
              "items_per_request": args.items_per_request, "replicas": args.replicas,
              "rm": str(args.rm_dir) if args.rm_dir else f"random {args.random_backbone}",
              "levels": {str(c): v for c, v in levels.items()}, "soak": soaked,
              "soak_ok": soaked["status_5xx"] == 0 and soaked["valid_wrong_or_failed"] == 0
              and soaked["malformed_not_4xx"] == 0}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
