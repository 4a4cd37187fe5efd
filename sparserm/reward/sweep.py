"""``rm sweep``: choose the layer L and the number of latents K on validation data (the paper leaves both to
manual search).

One truncated pass to the deepest candidate layer (``model.layer`` plus ``model.extra_layers``) gives every
candidate layer's states at no extra model cost; for a trained SAE (the embedded default) each candidate
layer gets its own SAE, trained from that same pass's token sample. Each (L, K in ``reward.sweep_k``) is
scored by ``reward.sweep_folds``-fold cross-validation over the training split (train + validation pairs,
folds by prompt): a head per fold is fitted on the other folds, its best epoch chosen and its accuracy
taken on its own fold. The best mean fold accuracy (ties: lower mean loss) picks (L, K). A single
validation split of a few hundred pairs moves by several points with the split and the seed and would
pick on noise; cross-validation scores every training pair once. Held-out accuracies (the mean over the
fold heads) are reported for every cell but never used to choose.
"""
from __future__ import annotations

import dataclasses
from statistics import fmean
from pathlib import Path

from sparserm.config import Config
from sparserm.features.stage import run_features
from sparserm.manifest import write_json, write_manifest
from sparserm.reward.directions import directions, select_latents
from sparserm.reward.inputs import head_inputs
from sparserm.reward.prepare import prepare_reward_data
from sparserm.reward.stage import evaluate_head, fit_heads, head_job


def layer_config(cfg: Config, layer: int) -> Config:
    """``cfg`` reading ``layer`` from the same pass (the layer set, hence the activation cache, is unchanged)."""
    layers = cfg.model.layers
    model = dataclasses.replace(cfg.model, layer=layer, extra_layers=tuple(x for x in layers if x != layer))
    return dataclasses.replace(cfg, model=model)


def check_folds(fold, n_folds: int):
    """``fold`` (each pair's fold) when every fold holds a pair, else a ValueError naming the empty ones (the
    folds go by prompt, so fewer prompts than folds leave some empty)."""
    empty = [f for f in range(n_folds) if not (fold == f).any()]
    if empty:
        raise ValueError(f"reward.sweep_folds={n_folds}: fold(s) {empty} hold none of the {len(fold)} train+val "
                         "pairs (folds go by prompt); lower reward.sweep_folds or give the sweep more prompts")
    return fold


def run_sweep(cfg: Config, out_dir: Path) -> Path:
    cache = run_features(cfg, out_dir)  # one pass, to the deepest candidate layer
    rows = []
    n_folds = cfg.reward.sweep_folds
    if n_folds < 2:
        raise ValueError(f"reward.sweep_folds must be >= 2, got {n_folds}")
    cells, jobs = [], []  # every (layer, K) cell's fold heads, fitted in one Ray Train run
    for layer in cfg.model.layers:
        cfg_l = layer_config(cfg, layer)
        rd = prepare_reward_data(cfg_l, out_dir, cache=cache)
        pool = rd.train.join(rd.val)
        fold = check_folds(pool.folds(n_folds, cfg.data.split_salt), n_folds)
        w_dec = rd.sae.W_dec.detach().cpu().float()
        for k in cfg.reward.sweep_k:
            if 2 * k > w_dec.shape[0]:
                print(f"[sweep] layer {layer}: K={k} needs {2 * k} latents, the SAE has {w_dec.shape[0]}; skipped")
                continue
            pos, neg = select_latents(rd.freqs.mu_w, rd.freqs.mu_l, k)
            rd_k = dataclasses.replace(rd, pos_ids=pos, neg_ids=neg, dirs=directions(w_dec, pos, neg))
            cells.append((layer, k, rd_k, head_inputs("topk", rd_k, rd_k.eval)))  # one held-out input for its folds
            jobs += [head_job(cfg_l, dataclasses.replace(rd_k, train=pool.take(fold != f), val=pool.take(fold == f)),
                              f"L{layer}-K{k}-fold{f}") for f in range(n_folds)]
    fits = iter(fit_heads(cfg, jobs, out_dir, "sweep", progress=False) if jobs else [])
    for layer, k, rd_k, x_eval in cells:
        folds = [next(fits) for _ in range(n_folds)]
        val_rows = [fit.history[fit.best_epoch - 1] for fit in folds]
        evals = [evaluate_head(fit, x_eval, rd_k.eval) for fit in folds]
        row = {"layer": layer, "k": k, "val_accuracy": fmean([b["val_accuracy"] for b in val_rows]),
               "val_loss": fmean([b["val_loss"] for b in val_rows]), "best_epochs": [f.best_epoch for f in folds],
               "fold_accuracy": [b["val_accuracy"] for b in val_rows],
               "eval_accuracy": {src: fmean([e[src] for e in evals]) for src in evals[0]},
               "sae": {key: rd_k.sae_metrics.get(key) for key in ("fvu", "l0", "dead_fraction")}}
        rows.append(row)
        print(f"[sweep] layer {layer} K={k}: val {row['val_accuracy']:.4f} eval {row['eval_accuracy']['all']:.4f}",
              flush=True)
    if not rows:
        raise ValueError("rm sweep: no (layer, K) cell could be fitted; check reward.sweep_k against the SAE width")
    chosen = max(rows, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    write_json(out_dir / "sweep.json", {"rows": rows, "chosen": {"layer": chosen["layer"], "k": chosen["k"]},
                                        "n_pairs": {"train": len(pool), "folds": n_folds, "eval": len(rd.eval)}})
    sources = sorted({s for r in rows for s in r["eval_accuracy"]} - {"all"}) + ["all"]
    lines = ["# SparseRM sweep over layer L and K (chosen by cross-validation on the training split)", "",
             f"Backbone `{cfg.model.name}`; one pass to layer {max(cfg.model.layers)}; "
             f"{len(pool)} training pairs in {n_folds} cross-validation folds (by prompt); {len(rd.eval)} held-out "
             f"pairs (mean over the fold heads).", "",
             "| layer | K | CV acc | " + " | ".join(f"eval {s}" for s in sources) + " | SAE fvu |",
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
