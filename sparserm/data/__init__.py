"""Preference data: loaders, the train/eval split, checks and rejects."""
from sparserm.data.check import check
from sparserm.data.loaders import LOADERS, load_pairs, resolve_format
from sparserm.data.ray_dataset import to_ray_dataset
from sparserm.data.rejects import write_rejects
from sparserm.data.schema import DataError, LoadResult
from sparserm.data.split import is_eval, split_rows
from sparserm.data.truthfulqa import MCQuestion, load_truthfulqa_mc

__all__ = [
    "LOADERS",
    "DataError",
    "LoadResult",
    "MCQuestion",
    "check",
    "is_eval",
    "load_pairs",
    "load_truthfulqa_mc",
    "resolve_format",
    "split_rows",
    "to_ray_dataset",
    "write_rejects",
]
