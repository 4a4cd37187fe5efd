"""``steer_eval.json`` / ``steer_eval.md`` of ``sparserm steer evaluate``: one row per variant, paired intervals
against the unsteered model, and the FLOP counts per map size."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from sparserm.config import Config
from sparserm.manifest import write_json

LIKELIHOOD = ("mc1", "mc2", "harmless")  # per-item metrics measured under steering, compared paired
COLUMNS = ("variant", "win_rate", "win_rate_lo", "win_rate_hi", "rm_score_mean", *LIKELIHOOD, "edited_token_share",
           "edited_latent_share", "latents_per_edited_token", "mean_response_tokens")
DEFINITIONS = {
    "win_rate": "held-out prompts where SparseRM scores the row's generation above the unsteered one on the same "
                "prompt, seed and batch (ties 1/2); lo/hi: 95% bootstrap interval over prompts",
    "mc1": "TruthfulQA MC1 as lm-eval's truthfulqa_mc1, the row's steering applied to the likelihood forwards",
    "mc2": "TruthfulQA MC2 as lm-eval's truthfulqa_mc2, likewise",
    "harmless": "HH eval pairs where the chosen response has the higher length-normalised log-prob, likewise",
    "edited_token_share": "generated token positions (the forwards that emitted a row's tokens, its EOS included) "
                          "at which at least one latent was edited",
    "edited_latent_share": "per prompt, the share of its selected latents edited at least once (mean over prompts)",
    "latents_per_edited_token": "latents changed per edited token position",
    "positions": "scoring an answer, the edit acts at the context's last token and every answer token (the "
                 "positions that predict the answer's tokens, as in decoding), never at the context's earlier "
                 "tokens; the gate reads the whole context (for TruthfulQA the QA primer and the question)",
    "flops": "forward ~ 2 x weights x tokens; build: the backbone to the output block once per triple (prompt once) "
             "+ both SAEs' encodes + G^T D; one DPO round: policy fwd+bwd (3x; LoRA ~2x) every epoch + the "
             "reference's forward, chosen and rejected each with their prompt (sparserm.steering.flops); DSPA "
             "reports up to 4.47x fewer alignment-stage FLOPs than a two-stage training pipeline",
}


def generation_metrics(gens: dict, baseline: dict, n_boot: int, seed: int) -> tuple[dict, list[float]]:
    from sparserm.align.evaluate import wins
    from sparserm.reward.accuracy import paired_difference

    rows, base = gens["rows"], baseline["rows"]
    w = wins([r["score"] for r in rows], [r["score"] for r in base])
    ci = paired_difference(w, [0.0] * len(w), n_boot=n_boot, seed=seed)  # the mean of w and its interval
    steps = sum(r["n_tokens"] + int(r["finished"]) for r in rows)
    st = [r["steering"] for r in rows if r["steering"]]
    edited = sum(s["edited_tokens"] for s in st)
    picked = [s["edited_latents"] / len(s["latents"]) for s in st if s["latents"]]
    out = {"win_rate": ci["diff"], "win_rate_lo": ci["lo"], "win_rate_hi": ci["hi"], "n_prompts": len(w),
           "rm_score_mean": sum(r["score"] for r in rows) / len(rows),
           "mean_response_tokens": sum(r["n_tokens"] for r in rows) / len(rows),
           "edited_token_share": edited / steps if st and steps else 0.0,
           "edited_latent_share": sum(picked) / len(picked) if picked else 0.0,
           "latents_per_edited_token": sum(s["latent_edits"] for s in st) / edited if edited else 0.0}
    return out, w


def rows_and_items(result: dict, n_boot: int, seed: int, baseline: str) -> tuple[list[dict], dict]:
    rows, per_item = [], {}
    base_gens = result["rows"][baseline].get("generations")
    for name, parts in result["rows"].items():
        row, items = {"variant": name}, {}
        if parts.get("generations"):
            metrics, items["win_rate"] = generation_metrics(parts["generations"], base_gens, n_boot, seed)
            row.update(metrics)
        for part in ("mc", "harmless"):
            values = dict(parts.get(part) or {})
            items.update(values.pop("per_item", {}))
            row.update(values)
        rows.append(row)
        per_item[name] = items
    return rows, per_item


def paired(per_item: dict, n_boot: int, seed: int, baseline: str) -> list[dict]:
    """Each row minus ``baseline`` on every likelihood metric both measured on the same items."""
    from sparserm.reward.accuracy import paired_difference

    base = per_item[baseline]
    return [{"variant": name, "metric": m, "n": len(items[m]),
             **paired_difference(items[m], base[m], n_boot=n_boot, seed=seed)}
            for name, items in per_item.items() if name != baseline
            for m in LIKELIHOOD if items.get(m) and len(items[m]) == len(base.get(m) or ())]


def _fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + \
        ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]


def write_report(out: Path, cfg: Config, result: dict, ev, seconds: float) -> dict:
    from sparserm.steering.evaluate import UNSTEERED

    e = cfg.steer.eval
    rows, per_item = rows_and_items(result, e.bootstrap, cfg.run.seed, UNSTEERED)
    diffs = paired(per_item, e.bootstrap, cfg.run.seed, UNSTEERED)
    g = ev.given
    setup = {"map": str(ev.map_dir), "model": cfg.model.name, "input": asdict(g.input), "output": asdict(g.output),
             "settings": asdict(ev.settings), "rm_dir": ev.rm_dir, "n_prompts": len(ev.items.prompts),
             "n_hh_pairs": len(ev.items.hh_pairs), "n_mc_questions": len(ev.items.mc), "maps": result["maps"],
             "sampling": {k: getattr(cfg.align.generate, k) for k in ("temperature", "top_p", "max_new_tokens",
                                                                      "max_prompt_tokens", "batch_size")},
             "bootstrap": e.bootstrap, "seconds": seconds}
    report = {"setup": setup, "rows": rows, "paired_differences": diffs, "flops": result["flops"],
              "per_item": per_item, "definitions": DEFINITIONS}
    write_json(out / "steer_eval.json", report)
    s = ev.settings
    text = ["# DSPA-style steering: evaluation", "",
            f"Map {ev.map_dir} on `{cfg.model.name}`: input SAE at layer {g.input.layer} ({g.input.d_sae} latents), "
            f"output SAE at layer {g.output.layer} ({g.output.d_sae}); mode {s.mode}, alpha {s.alpha}, k_prompt "
            f"{s.k_prompt}, k_diff {s.k_diff}. {setup['n_prompts']} held-out prompts, {setup['n_hh_pairs']} HH pairs, "
            f"{setup['n_mc_questions']} TruthfulQA questions; judge {ev.rm_dir}.", ""]
    text += _table(list(COLUMNS), [[r.get(c) for c in COLUMNS] for r in rows]) + [""]
    if diffs:
        text += _table(["variant", "metric", "n", "minus unsteered", "95% paired bootstrap"],
                       [[d["variant"], d["metric"], d["n"], f"{d['diff']:+.3f}", f"[{d['lo']:+.3f}, {d['hi']:+.3f}]"]
                        for d in diffs]) + [""]
    text += _table(["triples", "build FLOPs", "DPO round FLOPs", "DPO / build", "DPO (LoRA) / build"],
                   [[n, f"{f['build']['total']:.3e}", f"{f['dpo']['total']:.3e}", f["dpo_over_build"],
                     f["dpo_lora_over_build"]] for n, f in result["flops"]["by_triples"].items()]) + [""]
    trained = result["flops"]["sae_training"]
    if trained:
        text += ["SAEs trained here (once, cached; registry SAEs come pretrained and are not counted): " + ", ".join(
            f"{side} {f:.3e} FLOPs" for side, f in trained.items()) + ".", ""]
    text += ["Definitions:", ""] + [f"- `{k}`: {v}" for k, v in DEFINITIONS.items()] + [""]
    (out / "steer_eval.md").write_text("\n".join(text))
    return report
