"""``rm evaluate``: accuracy of a reward-model folder on any preference file the loaders accept."""
from __future__ import annotations

from pathlib import Path

from sparserm.progress import progress_bar

from sparserm.data import load_pairs, write_rejects
from sparserm.reward.accuracy import pair_accuracy
from sparserm.reward.model import SparseRM

BATCH = 16


def evaluate_rm(rm_dir: str | Path, data: str, format: str = "auto", max_pairs: int | None = None,
                out_dir: Path | None = None) -> dict:
    loaded = load_pairs(data, format, max_pairs=max_pairs)
    rm = SparseRM.load(rm_dir)
    s_w, s_l = [], []
    rows = loaded.rows
    for i in progress_bar(range(0, len(rows), BATCH), desc="rm evaluate", unit="batch", disable=not rows):
        chunk = rows[i: i + BATCH]
        w, l = rm.score_pairs([r["prompt"] for r in chunk], [r["chosen"] for r in chunk], [r["rejected"] for r in chunk])
        s_w.extend(w)
        s_l.extend(l)
    result = {"accuracy": pair_accuracy(s_w, s_l) if rows else None, "n_pairs": len(rows),
              "n_rejected": len(loaded.rejects), "reasons": loaded.reason_counts()}
    if out_dir is not None:
        result["rejects_path"] = str(write_rejects(loaded.rejects, Path(out_dir) / "rejects.jsonl"))
    return result
