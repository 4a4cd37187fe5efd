"""``rm ablate``: every variant on the same features and split, one table.

Head inputs (top-K directions, random directions, raw SAE activations of the selected latents, the dense
pooled state) with the configured loss; the three losses on the top-K inputs; a response-length baseline.
"""
from __future__ import annotations

from pathlib import Path

from sparserm.config import Config
from sparserm.manifest import write_json, write_manifest
from sparserm.reward.inputs import head_inputs
from sparserm.reward.losses import LOSSES
from sparserm.reward.prepare import prepare_reward_data
from sparserm.reward.stage import evaluate_head, fit_head, length_baseline

INPUT_LABELS = {"topk": "SparseRM (top-K directions)", "random": "random directions", "raw_sae": "raw SAE activations",
                "dense": "DenseRM (dense pooled state)"}


def run_ablation(cfg: Config, out_dir: Path) -> Path:
    rd = prepare_reward_data(cfg, out_dir)
    rows = []
    variants = [(name, cfg.reward.loss) for name in INPUT_LABELS] + \
               [("topk", loss) for loss in LOSSES if loss != cfg.reward.loss]
    for inputs, loss in variants:
        name = f"{inputs}-{loss}"
        print(f"[ablate] {name}", flush=True)
        result = fit_head(cfg, rd, out_dir, inputs=inputs, loss=loss, name=name, progress=False)
        acc = evaluate_head(result, head_inputs(inputs, rd, rd.eval), rd.eval)
        rows.append({"variant": f"{INPUT_LABELS[inputs]}, {loss} loss", "inputs": inputs, "loss": loss,
                     "in_dim": int(head_inputs(inputs, rd, rd.val)["x_w"].shape[1]), "best_epoch": result.best_epoch,
                     "accuracy": acc})
    rows.append({"variant": "response length (longer wins)", "inputs": "length", "loss": None, "in_dim": 1,
                 "best_epoch": None, "accuracy": length_baseline(rd.eval)})
    sources = sorted({k for r in rows for k in r["accuracy"]} - {"all"}) + ["all"]
    write_json(out_dir / "ablation.json", {"rows": rows, "n_pairs": {"train": len(rd.train), "val": len(rd.val),
                                                                      "eval": len(rd.eval)}, "sae": rd.sae_metrics})
    lines = ["# SparseRM ablation (held-out accuracy)", "",
             f"Backbone `{cfg.model.name}` layer {cfg.model.layer}, K = {cfg.reward.top_k}; "
             f"{len(rd.train)} train / {len(rd.val)} val / {len(rd.eval)} eval pairs.", "",
             "| variant | " + " | ".join(sources) + " |", "| --- |" + " --- |" * len(sources)]
    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(f"{r['accuracy'].get(s, float('nan')):.3f}" for s in sources) + " |")
    (out_dir / "ablation.md").write_text("\n".join(lines) + "\n")
    write_manifest(out_dir, cfg, "rm-ablate", inputs=rd.cache.summary.get("inputs", {}))
    print("\n".join(lines), flush=True)
    return out_dir / "ablation.md"
