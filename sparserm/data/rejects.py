"""Write rejected records as JSON lines."""
from __future__ import annotations

from pathlib import Path


def write_rejects(rejects: list[dict], path: str | Path) -> Path:
    """One JSON object a line (``row_id``, ``source``, ``reason``, ``detail``); an empty list writes
    an empty file. Parent folders are created. Returns the path written."""
    from sparserm.manifest import write_jsonl

    return write_jsonl(Path(path), rejects)
