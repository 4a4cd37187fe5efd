"""Preference rows as a Ray Dataset."""
from __future__ import annotations

from typing import Any


def to_ray_dataset(rows: list[dict]) -> Any:
    """``ray.data.from_items(rows)``: one record per row, columns prompt/chosen/rejected/source/row_id.
    Ray is imported here so that loading data never needs it (Ray starts on first use if needed)."""
    import ray.data

    return ray.data.from_items(list(rows))


def actor_pass(items: list[dict], actor_cls: type, constructor_kwargs: dict, *, blocks: int, resources) -> Any:
    """``items`` in ``blocks`` blocks, each handed whole to one call of an ``actor_cls`` instance (numpy batches) of
    a pool of ``resources.num_actors`` actors with ``num_cpus`` / ``num_gpus`` each: the Ray Data pass every
    model-forward stage runs (features, the FPO reference cache, the steering map). Returns the lazy Dataset.

    An actor that dies (its process killed, its node lost) is restarted, its constructor run again, and the calls
    it held are retried on it: Ray Data's actor defaults (``max_restarts=-1``, ``max_task_retries=-1``; passing them
    is deprecated in Ray 2.60), which every stage relies on, so a call of ``actor_cls`` must give a block the same
    result every time (tests/features/test_extract_faults.py kills one mid-pass)."""
    import ray.data

    ds = ray.data.from_items(items, override_num_blocks=blocks)
    return ds.map_batches(
        actor_cls,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=None,  # one block per call: re-batching blocks of other sizes leaves remainder calls
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=resources.num_actors),
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus or None,
    )


def collect_sorted(ds, key: str, total: int, label: str, progress: bool = True) -> Any:
    """The pyarrow blocks of ``ds`` as one table sorted by column ``key``, printing ``label done/total`` per block."""
    import pyarrow as pa

    tables, done = [], 0
    for t in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        tables.append(t)
        done += len(t)
        if progress:
            print(f"{label} {done}/{total}", flush=True)
    return pa.concat_tables(tables).sort_by(key)
