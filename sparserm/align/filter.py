"""SparseRM as the filter of generated pairs: keep a pair only when the RM agrees with its label."""
from __future__ import annotations

import numpy as np

FILTERS = ("rm", "none")


def filter_pairs(pairs: list[dict], s_chosen: list[float], s_rejected: list[float], mode: str) -> tuple[list[dict], dict]:
    """``rm``: keep exactly the pairs with s_chosen >= s_rejected; ``none``: keep all (the WO-RM baseline).
    Every pair gets its scores; returns the kept pairs and the round's counts and margin statistics."""
    if mode not in FILTERS:
        raise ValueError(f"align.filters: {mode!r} is unknown: expected one of {FILTERS}")
    if not (len(pairs) == len(s_chosen) == len(s_rejected)):
        raise ValueError(f"{len(pairs)} pairs but {len(s_chosen)}/{len(s_rejected)} scores")
    kept = []
    for pair, sc, sr in zip(pairs, s_chosen, s_rejected):
        pair.update(score_chosen=float(sc), score_rejected=float(sr))
        if mode == "none" or sc >= sr:
            kept.append(pair)
    margins = np.asarray(s_chosen, dtype=np.float64) - np.asarray(s_rejected, dtype=np.float64)
    kept_m = np.asarray([p["score_chosen"] - p["score_rejected"] for p in kept], dtype=np.float64)
    tasks = [p.get("task") for p in pairs]
    per_task = {t: float((margins[[x == t for x in tasks]] >= 0).mean()) for t in dict.fromkeys(tasks)}
    stats = {"filter": mode, "n_pairs": len(pairs), "n_kept": len(kept), "n_dropped": len(pairs) - len(kept),
             "kept_share": len(kept) / len(pairs) if pairs else 0.0,
             # the share of rule-labelled pairs the RM orders the same way (what the rm filter keeps)
             "rm_agreement": float((margins >= 0).mean()) if len(margins) else 0.0,
             "rm_agreement_per_task": per_task,
             "margin_mean": float(margins.mean()) if len(margins) else 0.0,
             "margin_mean_kept": float(kept_m.mean()) if len(kept_m) else 0.0}
    return kept, stats
