"""``fpo.json`` / ``fpo.md`` of ``sparserm fpo``: one row per policy (the base, then each method), and FPO minus
each other policy on every per-item metric with a 95% paired bootstrap interval."""
from __future__ import annotations

from pathlib import Path

from sparserm.config import Config
from sparserm.manifest import write_json

METRICS = ("accuracy", "entropy", "win_rate", "mc1", "mc2")  # per-item metrics (intervals)
TRAIN = ("beta", "steps", "train_loss", "train_reward_accuracy", "peak_rss_mb_above_baseline", "peak_gpu_mb",
         "seconds_per_step", "cpu_seconds_per_step", "train_seconds")
COLUMNS = ("method", *METRICS, *TRAIN)
DEFINITIONS = {
    "accuracy": "held-out pairs where the length-normalised log-prob of chosen is above rejected's (ties wrong)",
    "entropy": "mean over sampled generations of the mean per-token predictive entropy (nats, full softmax) of the "
               "policy along its own response (FPO, after TDPO, measures diversity by the policy's predictive entropy "
               "on its own samples)",
    "win_rate": "held-out prompts where SparseRM scores the policy's generation above the base model's (ties 1/2)",
    "mc1": "TruthfulQA MC1 as lm-eval's truthfulqa_mc1", "mc2": "TruthfulQA MC2 as lm-eval's truthfulqa_mc2",
    "peak_rss_mb_above_baseline": "trainer history: peak host memory above the worker's baseline (max over epochs)",
    "peak_gpu_mb": "trainer history: peak GPU memory (max over epochs)",
    "seconds_per_step": "trainer history: seconds per optimizer step (mean over epochs)",
    "cpu_seconds_per_step": "trainer history: the worker's CPU seconds (all threads) per optimizer step (mean over "
                            "epochs; moves far less than wall seconds with the machine's load)",
    "train_seconds": "wall time of the invocation that finished the method's training",
}


def train_row(cfg: Config, name: str, stored: dict) -> dict:
    """What the trainer's history says of one method's run (absent fields: None)."""
    from sparserm.align.objectives import get_objective

    hist = stored["history"]

    def present(key: str) -> list[float]:
        return [h[key] for h in hist if h.get(key) is not None]

    rss, gpu, sps = present("peak_rss_mb_above_baseline"), present("peak_gpu_mb"), present("seconds_per_step")
    cps = present("cpu_seconds_per_step")
    return {"beta": get_objective(name).beta_of(cfg.align.loss), "epochs": len(hist),
            "steps": hist[-1].get("global_step"), "train_loss": hist[-1]["loss"],
            "train_reward_accuracy": hist[-1]["reward_accuracy"],
            "peak_rss_mb_above_baseline": max(rss) if rss else None,
            "peak_gpu_mb": max(gpu) if gpu else None, "seconds_per_step": sum(sps) / len(sps) if sps else None,
            "cpu_seconds_per_step": sum(cps) / len(cps) if cps else None,
            "train_seconds": stored.get("seconds")}


def paired_intervals(per_item: dict[str, dict[str, list[float]]], n_boot: int, seed: int,
                     target: str = "fpo") -> list[dict]:
    """``target`` minus every other policy, per metric both measured on the same items."""
    from sparserm.reward.accuracy import paired_difference

    if target not in per_item:
        return []
    out = []
    for other in (p for p in per_item if p != target):
        for metric in METRICS:
            a, b = per_item[target].get(metric), per_item[other].get(metric)
            if a and b and len(a) == len(b):
                out.append({"metric": metric, "baseline": other, "n": len(a),
                            **paired_difference(a, b, n_boot=n_boot, seed=seed)})
    return out


def _fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def table_md(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows])


def intervals_md(diffs: list[dict]) -> str:
    lines = ["| metric | FPO minus | n | difference | 95% paired bootstrap |", "| --- | --- | --- | --- | --- |"]
    return "\n".join(lines + [f"| {d['metric']} | {d['baseline']} | {d['n']} | {d['diff']:+.3f} | "
                              f"[{d['lo']:+.3f}, {d['hi']:+.3f}] |" for d in diffs])


def write_report(out: Path, cfg: Config, result: dict, sae: dict | None = None) -> dict:
    from sparserm.fpo.compare import BASE

    evals, trained = result["evals"], result["trained"]
    rows = []
    for name, ev in evals.items():
        row = {"method": name, **ev["metrics"]}
        if name != BASE:
            row.update(train_row(cfg, name, trained[name]))
        rows.append(row)
    diffs = paired_intervals({n: ev["per_item"] for n, ev in evals.items()}, cfg.fpo.bootstrap, cfg.run.seed)
    t = cfg.align.train
    setup = {"methods": list(cfg.fpo.methods), "n_train_pairs": result["n_train_pairs"],
             "epochs": t.epochs, "batch_size": t.batch_size, "lr": t.lr,
             "lora_r": t.lora.r, "sae": sae or {}, "bootstrap": cfg.fpo.bootstrap}
    report = {"setup": setup, "rows": rows, "paired_differences": diffs, "definitions": DEFINITIONS}
    write_json(out / "fpo.json", report)
    text = ["# FPO against DPO, SimPO and TDPO-2", "",
            f"Every method: the same {setup['n_train_pairs']} training pairs, {t.epochs} epoch(s) of batch "
            f"{t.batch_size} at lr {t.lr} (LoRA r {t.lora.r}) from the base model; only "
            f"`align.loss.name` differs (beta: each objective's default unless `align.loss.beta` is set). "
            f"FPO's SAE: {(sae or {}).get('dir')} at layer {(sae or {}).get('layer')} "
            f"(from {(sae or {}).get('resolved_from')}).", "", table_md(rows), ""]
    if diffs:
        text += [intervals_md(diffs), ""]
    text += ["Definitions:", ""] + [f"- `{k}`: {v}" for k, v in DEFINITIONS.items()] + [""]
    (out / "fpo.md").write_text("\n".join(text))
    return report
