"""``sparserm steer layers CONFIG``: the input and output layers of a trained-here pair of SAEs, by measurement.

Candidates: ``steer.sweep_input_layers`` x ``steer.sweep_output_layers`` (pairs with input <= output). One
features pass to the deepest candidate records every candidate's token sample from the same forward, and an SAE
is trained per candidate layer (``steering.saes.trained_saes``, cached by the pass's key, as ``steer build``
trains its two); one density pass (``build.density_pass``, every candidate SAE read in the same forward) over the
first ``steer.max_triples`` train-split triples and as many eval-split ones gives each candidate's g and drho.
Per pair (in, out), the map built from the train triples as ``steer build`` builds it, and:

- ``explained_in``, ``explained_out``: each SAE's explained variance on held-out tokens (1 - fvu, massive
  tokens left out), the share of the residual the edit can act on (the rest is the error term it keeps);
- ``mass``: ``sum |A_ij|`` of the sparsified map, how strongly prompt latents go with preference differences;
- ``heldout_agreement``: on the eval triples, decoding's own selection (gate, ``k_diff``) per prompt, the share
  of selected latents with sign(s_j) = sign(drho_j) among those whose drho_j is not 0, pooled over prompts
  (0.5: the map says nothing about held-out preferences; 1: every selected latent moves the way the held-out
  chosen response differs from the rejected one). Mass alone grows with noise, so it does not choose.

Choice: the pair with the highest held-out agreement among those whose SAEs both explain at least
``MIN_EXPLAINED`` (ties: the larger mass); the report says which and why. ``layers.md`` / ``layers.json``.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from sparserm.config import Config, ConfigError
from sparserm.manifest import write_json, write_manifest

MIN_EXPLAINED = 0.6


def agreement(G: torch.Tensor, D: torch.Tensor, cmap, settings) -> tuple[float, int]:
    """(share of selected latents whose score sign matches drho's, number compared) over triples G, D."""
    from sparserm.steering.vector import steering_vector

    same = total = 0
    for g, d in zip(G, D):
        v = steering_vector(g, cmap, settings)
        dv = d[v.latents]
        nz = dv != 0
        same += int((torch.sign(v.scores[nz]) == torch.sign(dv[nz])).sum())
        total += int(nz.sum())
    return (same / total if total else float("nan")), total


def choose(rows: list[dict]) -> dict:
    """The pair whose SAEs both explain enough (else any) with the best held-out agreement, then the larger
    mass; a pair with nothing compared (agreement NaN: an empty map) ranks below every measured one."""
    ok = [r for r in rows if min(r["explained_in"], r["explained_out"]) >= MIN_EXPLAINED] or rows
    def rank(r: dict) -> tuple:
        a = r["heldout_agreement"]
        return (not math.isnan(a), -math.inf if math.isnan(a) else a, r["mass"])

    return max(ok, key=rank)


def run_layer_sweep(cfg: Config, out: Path) -> Path:
    from sparserm.steering.build import density_pass
    from sparserm.steering.conditional_map import conditional_difference_map, sparsify
    from sparserm.steering.saes import trained_saes
    from sparserm.steering.sources import load_triples, sae_side
    from sparserm.steering.vector import SteerSettings

    s = cfg.steer
    pairs = [(i, o) for i in s.sweep_input_layers for o in s.sweep_output_layers if i <= o]
    if not pairs:
        raise ConfigError(f"steer.sweep_input_layers={list(s.sweep_input_layers)} is invalid: expected candidate "
                          f"layers, with steer.sweep_output_layers={list(s.sweep_output_layers)}, giving at least "
                          "one pair with input <= output")
    out = Path(out)
    saes = trained_saes(cfg, {*s.sweep_input_layers, *s.sweep_output_layers}, out / "sae_pass")
    candidates = (("input", s.sweep_input_layers), ("output", s.sweep_output_layers))
    sides = [sae_side(cfg, side, saes[layer]["folder"], layer=layer, key=f"the SAE of layer {layer}")
             for side, layers in candidates for layer in layers]
    train, held = load_triples(cfg).rows, load_triples(cfg, split="eval").rows
    dense, _ = density_pass(cfg, train + held, sides)
    n = len(train)
    by_side = {(side.side, side.layer): x for side, x in zip(sides, dense)}
    settings = SteerSettings.of(s).check()
    rows = []
    for i, o in pairs:
        G, D = by_side[("input", i)], by_side[("output", o)]
        cmap = sparsify(conditional_difference_map(G[:n], D[:n]), s)
        agree, compared = agreement(G[n:], D[n:], cmap, settings)
        rows.append({"input_layer": i, "output_layer": o, "explained_in": 1 - saes[i]["quality"]["fvu"],
                     "explained_out": 1 - saes[o]["quality"]["fvu"], "mass": float(cmap.values.abs().sum()),
                     "nnz": cmap.nnz, "heldout_agreement": agree, "n_compared": compared})
        print(f"[steer layers] {i} -> {o}: agreement {agree:.3f} over {compared}, mass {rows[-1]['mass']:.4f}",
              flush=True)
    best = choose(rows)
    report = {"rows": rows, "chosen": {"input_layer": best["input_layer"], "output_layer": best["output_layer"]},
              "rule": f"highest heldout_agreement among pairs whose SAEs both explain >= {MIN_EXPLAINED} "
                      "(ties: larger mass)", "n_train_triples": n, "n_heldout_triples": len(held),
              "saes": {str(k): v for k, v in saes.items()}}
    write_json(out / "layers.json", report)
    lines = ["# Steering layers by measurement", "",
             f"`{cfg.model.name}`; one pass to layer {max(l for p in pairs for l in p)}; an SAE trained per "
             f"candidate layer; maps from {n} train-split triples, agreement on {len(held)} eval-split triples. "
             f"Chosen by: {report['rule']}.", "",
             "| input | output | explained in | explained out | mass | nnz | held-out agreement | compared |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        mark = " **(chosen)**" if r is best else ""
        lines.append(f"| {r['input_layer']} | {r['output_layer']}{mark} | {r['explained_in']:.3f} | "
                     f"{r['explained_out']:.3f} | {r['mass']:.4f} | {r['nnz']} | {r['heldout_agreement']:.3f} | "
                     f"{r['n_compared']} |")
    folders = {side: saes[best[f"{side}_layer"]]["folder"] for side in ("input", "output")}
    lines += ["", f"Build with it: `sparserm steer build CONFIG steer.input_layer={best['input_layer']} "
                  f"steer.output_layer={best['output_layer']}` (the SAEs then come from a pass over those two layers: "
                  f"the same token sample and training, a pass of its own), or with the SAEs above: "
                  f"`steer.input_sae_dir={folders['input']} steer.output_sae_dir={folders['output']}`."]
    (out / "layers.md").write_text("\n".join(lines) + "\n")
    write_manifest(out, cfg, "steer-layers", extra={"chosen": report["chosen"]})
    return out / "layers.md"
