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

    own_progress_only()
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


def own_progress_only() -> None:
    """Ray Data's own progress output off in this process (its bars on a terminal; elsewhere, as in a job's log, a
    block of status lines every few seconds): a stage shows its one bar of the rows it has, not Ray's operators."""
    import logging

    import ray.data

    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # its "progress bars disabled" line
    ray.data.DataContext.get_current().enable_progress_bars = False


def collect_sorted(ds, key: str, total: int, label: str, progress: bool = True, unit: str = "row") -> Any:
    """The pyarrow blocks of ``ds`` as one table sorted by column ``key``, with one progress bar ``label`` of the
    rows collected, counted in ``unit`` (stderr)."""
    import pyarrow as pa
    from sparserm.progress import progress_bar

    tables = []
    with progress_bar(total=total, desc=label, unit=unit, disable=not progress) as bar:
        for t in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            tables.append(t)
            bar.update(len(t))
    return pa.concat_tables(tables).sort_by(key)
