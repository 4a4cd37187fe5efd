"""``sparserm data check``: load one source, summarise it, write its rejects."""
from __future__ import annotations

import time
from pathlib import Path

from sparserm.data.loaders import load_pairs
from sparserm.data.rejects import write_rejects


def check(path: str, format: str = "auto", out_dir: Path | None = None) -> dict:
    """Load ``path`` and return a JSON-ready summary; rejects go to ``<out_dir>/rejects.jsonl``
    (default ``runs/data-check-<timestamp>/``). Raises DataError only for an unreadable file."""
    result = load_pairs(path, format)
    if out_dir is None:
        out_dir = Path("runs") / f"data-check-{time.strftime('%Y%m%d-%H%M%S')}"
    rejects_path = write_rejects(result.rejects, Path(out_dir) / "rejects.jsonl")
    return {
        "path": str(path),
        "format": result.format,
        "n_read": result.n_read,
        "n_pairs": len(result.rows),
        "n_rejected": len(result.rejects),
        "rejects_path": str(rejects_path),
        "reasons": result.reason_counts(),
    }
