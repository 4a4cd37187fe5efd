"""Write rejected records as JSON lines."""
from __future__ import annotations

import json
from pathlib import Path


def write_rejects(rejects: list[dict], path: str | Path) -> Path:
    """One JSON object a line (``row_id``, ``source``, ``reason``, ``detail``); an empty list writes
    an empty file. Parent folders are created. Returns the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for rej in rejects:
            fh.write(json.dumps(rej, ensure_ascii=False) + "\n")
    return path
