"""Deterministic train/eval split by a stable hash of the prompt.

A prompt goes to eval when ``sha256(salt + "\\x00" + prompt)``, read as a number in [0, 1), is
below ``eval_fraction``. The same prompt always lands on the same side (so all pairs of one prompt
stay together), on every machine and Python run (no use of ``hash()``), and growing
``eval_fraction`` only moves prompts from train to eval.
"""
from __future__ import annotations

import hashlib


def prompt_unit(prompt: str, salt: str = "sparserm") -> float:
    """The prompt's stable position in [0, 1)."""
    digest = hashlib.sha256(f"{salt}\x00{prompt}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_eval(prompt: str, eval_fraction: float, salt: str = "sparserm") -> bool:
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    return prompt_unit(prompt, salt) < eval_fraction


def split_rows(rows: list[dict], eval_fraction: float, salt: str = "sparserm") -> tuple[list[dict], list[dict]]:
    """(train_rows, eval_rows), each in the input order."""
    train, evals = [], []
    for row in rows:
        (evals if is_eval(row["prompt"], eval_fraction, salt) else train).append(row)
    return train, evals
