"""``rm ablate``: every variant on the same features and split, one table.

Head inputs (top-K directions, random directions, raw SAE activations of the selected latents, the dense
pooled state) with the configured loss; the three losses on the top-K inputs; a response-length baseline.
Each variant is fitted with ``reward.head_seeds`` head seeds: the table gives the mean held-out accuracy
and its spread over seeds, and SparseRM's difference to each other input with a paired bootstrap interval
over the held-out pairs (per-pair correctness averaged over seeds), so a gap can be told from noise.
"""
from __future__ import annotations

from pathlib import Path
from statistics import fmean, pstdev

import torch

from sparserm.config import Config
from sparserm.manifest import write_json, write_manifest
from sparserm.reward.accuracy import paired_difference
from sparserm.reward.inputs import head_inputs
from sparserm.reward.losses import LOSSES
from sparserm.reward.prepare import prepare_reward_data
from sparserm.reward.stage import accuracy_by_source, fit_heads, head_job, head_scores, length_baseline

INPUT_LABELS = {"topk": "SparseRM (top-K directions)", "random": "random directions", "raw_sae": "raw SAE activations",
                "dense": "DenseRM (dense pooled state)"}


def _cell(row: dict, source: str, n_seeds: int) -> str:
    """``mean ± spread`` (the spread only with several seeds), or a dash where the variant has no value."""
    if source not in row["accuracy"]:
        return "–"
    text = f"{row['accuracy'][source]:.3f}"
    if n_seeds > 1 and source in row["accuracy_std"]:
        text += f" ± {row['accuracy_std'][source]:.3f}"
    return text


def run_ablation(cfg: Config, out_dir: Path) -> Path:
    rd = prepare_reward_data(cfg, out_dir)
    seeds = [cfg.run.seed + i for i in range(max(1, cfg.reward.head_seeds))]
    rows, correct = [], {}
    variants = [(name, cfg.reward.loss) for name in INPUT_LABELS] + \
               [("topk", loss) for loss in LOSSES if loss != cfg.reward.loss]
    jobs = [head_job(cfg, rd, f"{inputs}-{loss}-s{seed}", inputs=inputs, loss=loss, seed=seed)
            for inputs, loss in variants for seed in seeds]
    print(f"[ablate] {len(variants)} variants x {len(seeds)} head seeds: {len(jobs)} heads in one Ray Train run",
          flush=True)
    fits = iter(fit_heads(cfg, jobs, out_dir, "ablate", progress=False))
    for inputs, loss in variants:
        name = f"{inputs}-{loss}"
        x_eval = head_inputs(inputs, rd, rd.eval)
        per_seed, hits, epochs = [], [], []
        for _ in seeds:
            result = next(fits)
            s_w, s_l = head_scores(result, x_eval)
            per_seed.append(accuracy_by_source(s_w, s_l, rd.eval))
            hits.append((s_w > s_l).double())
            epochs.append(result.best_epoch)
        correct[name] = torch.stack(hits).mean(0)
        rows.append({"variant": f"{INPUT_LABELS[inputs]}, {loss} loss", "name": name, "inputs": inputs, "loss": loss,
                     "in_dim": int(x_eval["x_w"].shape[1]), "best_epochs": epochs,
                     "accuracy": {src: fmean(a[src] for a in per_seed) for src in per_seed[0]},
                     "accuracy_std": {src: pstdev(a[src] for a in per_seed) for src in per_seed[0]},
                     "per_seed": per_seed})
    rows.append({"variant": "response length (longer wins)", "name": "length", "inputs": "length", "loss": None,
                 "in_dim": 1, "best_epochs": None, "accuracy": length_baseline(rd.eval), "accuracy_std": {}})
    ref = f"topk-{cfg.reward.loss}"
    gaps = {}
    for other in ("random", "raw_sae", "dense"):
        name = f"{other}-{cfg.reward.loss}"
        gaps[other] = {"all": paired_difference(correct[ref], correct[name], seed=cfg.run.seed)}
        for src in sorted(set(rd.eval.source.tolist())):
            m = torch.as_tensor(rd.eval.source == src)
            gaps[other][str(src)] = paired_difference(correct[ref][m], correct[name][m], seed=cfg.run.seed)
    sources = sorted({k for r in rows for k in r["accuracy"]} - {"all"}) + ["all"]
    n_pairs = {"train": len(rd.train), "val": len(rd.val), "eval": len(rd.eval)}
    write_json(out_dir / "ablation.json", {"rows": rows, "seeds": seeds, "sparserm_minus": gaps, "n_pairs": n_pairs,
                                           "sae": rd.sae_metrics})
    lines = ["# SparseRM ablation (held-out accuracy)", "",
             f"Backbone `{cfg.model.name}` layer {cfg.model.layer}, K = {cfg.reward.top_k}; "
             f"{len(rd.train)} train / {len(rd.val)} val / {len(rd.eval)} eval pairs; mean ± spread over head "
             f"seeds {seeds}.", "",
             "| variant | " + " | ".join(sources) + " |", "| --- |" + " --- |" * len(sources)]
    for r in rows:
        cells = [_cell(r, s, len(seeds)) for s in sources]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    lines += ["", "SparseRM minus each other input (same loss), in accuracy points, with a 95% paired bootstrap "
                  "interval over the held-out pairs:", "",
              "| SparseRM minus | " + " | ".join(sources) + " |", "| --- |" + " --- |" * len(sources)]
    for other, by_src in gaps.items():
        cells = [f"{100 * by_src[s]['diff']:+.1f} [{100 * by_src[s]['lo']:+.1f}, {100 * by_src[s]['hi']:+.1f}]"
                 for s in sources]
        lines.append(f"| {INPUT_LABELS[other]} | " + " | ".join(cells) + " |")
    (out_dir / "ablation.md").write_text("\n".join(lines) + "\n")
    write_manifest(out_dir, cfg, "rm-ablate", inputs=rd.cache.summary.get("inputs", {}), extra={"seeds": seeds})
    print("\n".join(lines), flush=True)
    return out_dir / "ablation.md"
