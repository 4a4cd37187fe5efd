"""Deterministic prompt-hash split."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sparserm.data import is_eval, load_pairs, split_rows

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
HH = DATA / "hh_rlhf_harmless.jsonl.gz"
TQA = DATA / "truthfulqa.csv"


def rows_for(prompts):
    return [{"prompt": p, "chosen": "a", "rejected": "b", "source": "t", "row_id": f"t:{i}"}
            for i, p in enumerate(prompts)]


def test_split_is_deterministic_and_partitions():
    rows = rows_for([f"prompt {i}" for i in range(2000)])
    train, evals = split_rows(rows, 0.25)
    assert split_rows(rows, 0.25) == (train, evals)
    assert len(train) + len(evals) == len(rows)
    assert sorted(r["row_id"] for r in train + evals) == sorted(r["row_id"] for r in rows)
    assert 0.22 < len(evals) / len(rows) < 0.28
    # order kept within each side
    assert [r["row_id"] for r in train] == [r["row_id"] for r in rows if r in train]


def test_split_stable_across_processes():
    """No use of Python's salted hash(): a fresh interpreter with another PYTHONHASHSEED agrees."""
    prompts = [f"q{i}" for i in range(50)]
    here = [is_eval(p, 0.3) for p in prompts]
    code = "from sparserm.data import is_eval; print(''.join('1' if is_eval(f'q{i}', 0.3) else '0' for i in range(50)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "".join("1" if e else "0" for e in here)


def test_salt_and_fraction():
    prompts = [f"prompt {i}" for i in range(500)]
    a = [is_eval(p, 0.5, "one") for p in prompts]
    b = [is_eval(p, 0.5, "two") for p in prompts]
    assert a != b
    # a bigger fraction only moves prompts into eval
    small = {p for p in prompts if is_eval(p, 0.1)}
    big = {p for p in prompts if is_eval(p, 0.3)}
    assert small < big
    assert not any(is_eval(p, 0.0) for p in prompts) and all(is_eval(p, 1.0) for p in prompts)
    with pytest.raises(ValueError):
        is_eval("x", 1.5)


@pytest.mark.skipif(not (HH.is_file() and TQA.is_file()), reason=f"shipped data not found in {DATA}")
def test_real_data_share_and_prompts_together():
    rows = load_pairs(str(HH)).rows + load_pairs(str(TQA)).rows
    train, evals = split_rows(rows, 0.2)
    assert len(train) + len(evals) == len(rows)
    train_prompts, eval_prompts = {r["prompt"] for r in train}, {r["prompt"] for r in evals}
    assert not train_prompts & eval_prompts  # all pairs of one prompt on one side
    n_prompts = len(train_prompts | eval_prompts)
    assert abs(len(eval_prompts) / n_prompts - 0.2) < 0.03
    assert abs(len(evals) / len(rows) - 0.2) < 0.04
