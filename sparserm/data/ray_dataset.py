"""Preference rows as a Ray Dataset."""
from __future__ import annotations

from typing import Any


def to_ray_dataset(rows: list[dict]) -> Any:
    """``ray.data.from_items(rows)``: one record per row, columns prompt/chosen/rejected/source/row_id.
    Ray is imported here so that loading data never needs it (Ray starts on first use if needed)."""
    import ray.data

    return ray.data.from_items(list(rows))
