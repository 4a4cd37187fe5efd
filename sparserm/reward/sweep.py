"""``rm sweep``: choose the layer L and the number of latents K on validation data (the paper leaves both to
manual search).

One truncated pass to the deepest candidate layer (``model.layer`` plus ``model.extra_layers``) gives every
candidate layer's states at no extra model cost; for a trained SAE (the embedded default) each candidate
layer gets its own SAE, trained from that same pass's token sample. For each (L, K in ``reward.sweep_k``)
the head is fitted on the training split and scored on the validation split; the best validation accuracy
(ties: lower validation loss) picks (L, K). Held-out accuracies are reported for every cell but never used
to choose.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from sparserm.config import Config
from sparserm.features.stage import run_features
from sparserm.manifest import write_json, write_manifest
from sparserm.reward.directions import directions, select_latents
from sparserm.reward.inputs import head_inputs
from sparserm.reward.prepare import prepare_reward_data
from sparserm.reward.stage import evaluate_head, fit_head


def layer_config(cfg: Config, layer: int) -> Config:
    """``cfg`` reading ``layer`` from the same pass (the layer set, hence the activation cache, is unchanged)."""
    layers = cfg.model.layers
    model = dataclasses.replace(cfg.model, layer=layer, extra_layers=tuple(x for x in layers if x != layer))
    return dataclasses.replace(cfg, model=model)


def run_sweep(cfg: Config, out_dir: Path) -> Path:
    cache = run_features(cfg, out_dir)  # one pass, to the deepest candidate layer
    rows = []
    for layer in cfg.model.layers:
        cfg_l = layer_config(cfg, layer)
        rd = prepare_reward_data(cfg_l, out_dir, cache=cache)
        w_dec = rd.sae.W_dec.detach().cpu().float()
        for k in cfg.reward.sweep_k:
            if 2 * k > w_dec.shape[0]:
                print(f"[sweep] layer {layer}: K={k} needs {2 * k} latents, the SAE has {w_dec.shape[0]}; skipped")
                continue
            pos, neg = select_latents(rd.freqs.mu_w, rd.freqs.mu_l, k)
            rd_k = dataclasses.replace(rd, pos_ids=pos, neg_ids=neg, dirs=directions(w_dec, pos, neg))
            result = fit_head(cfg_l, rd_k, out_dir, name=f"L{layer}-K{k}", progress=False)
            best = result.history[result.best_epoch - 1]
            row = {"layer": layer, "k": k, "val_accuracy": best["val_accuracy"], "val_loss": best["val_loss"],
                   "best_epoch": result.best_epoch,
                   "eval_accuracy": evaluate_head(result, head_inputs("topk", rd_k, rd_k.eval), rd_k.eval),
                   "sae": {key: rd.sae_metrics.get(key) for key in ("fvu", "l0", "dead_fraction")}}
            rows.append(row)
            print(f"[sweep] layer {layer} K={k}: val {row['val_accuracy']:.4f} eval {row['eval_accuracy']['all']:.4f}",
                  flush=True)
    if not rows:
        raise ValueError("rm sweep: no (layer, K) cell could be fitted; check reward.sweep_k against the SAE width")
    chosen = max(rows, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    write_json(out_dir / "sweep.json", {"rows": rows, "chosen": {"layer": chosen["layer"], "k": chosen["k"]},
                                        "n_pairs": {"train": len(rd.train), "val": len(rd.val), "eval": len(rd.eval)}})
    sources = sorted({s for r in rows for s in r["eval_accuracy"]} - {"all"}) + ["all"]
    lines = ["# SparseRM sweep over layer L and K (chosen on validation accuracy)", "",
             f"Backbone `{cfg.model.name}`; one pass to layer {max(cfg.model.layers)}; "
             f"{len(rd.train)} train / {len(rd.val)} val / {len(rd.eval)} eval pairs.", "",
             "| layer | K | val acc | " + " | ".join(f"eval {s}" for s in sources) + " | SAE fvu |",
             "| --- | --- | --- |" + " --- |" * len(sources) + " --- |"]
    for r in rows:
        mark = " **(chosen)**" if r is chosen else ""
        lines.append(f"| {r['layer']} | {r['k']}{mark} | {r['val_accuracy']:.3f} | "
                     + " | ".join(f"{r['eval_accuracy'].get(s, float('nan')):.3f}" for s in sources)
                     + f" | {r['sae']['fvu']} |")
    lines += ["", f"Train it: `sparserm rm train CONFIG model.layer={chosen['layer']} "
                  f"reward.top_k={chosen['k']}` (the features and SAEs above are cached)."]
    (out_dir / "sweep.md").write_text("\n".join(lines) + "\n")
    write_manifest(out_dir, cfg, "rm-sweep", inputs=cache.summary.get("inputs", {}),
                   extra={"chosen": {"layer": chosen["layer"], "k": chosen["k"]}})
    print("\n".join(lines), flush=True)
    return out_dir / "sweep.md"
