"""TruthfulQA CSV: preference pairs and the multiple-choice (MC1/MC2) view.

Columns: Type, Category, Question, Best Answer, Correct Answers, Incorrect Answers, Source; the
answer columns hold answers separated by ``"; "``. Answers are stripped, empty ones dropped and
duplicates within a column removed (first occurrence kept).

Pairs: a question with ``nc`` correct and ``ni`` incorrect answers gives ``max(nc, ni)`` pairs,
pair ``i`` = (chosen ``correct[i % nc]``, rejected ``incorrect[i % ni]``): every answer is used
at least once, the two sides stay balanced, and the order is fixed by the file. The prompt is
the question text. ``row_id`` is ``"<file>:<question row>:<pair index>"`` (the question row is the
0-based record number after the header). A question with no correct or no incorrect answer is
one reject (``no_correct_answer`` / ``no_incorrect_answer``, row_id ``"<file>:<row>"``); a pair
whose two answers are the same text is an ``identical_responses`` reject. ``n_read`` counts the
pairs formed plus the questions that formed none, so ``len(rows) + len(rejects) == n_read``.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from sparserm.data.schema import DataError, LoadResult, make_row

SEPARATOR = "; "
REQUIRED = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")


@dataclass
class MCQuestion:
    question: str
    best_answer: str
    correct: list[str]  # MC2 true set (includes the best answer)
    incorrect: list[str]  # MC1 and MC2 false set


def split_answers(cell: str | None) -> list[str]:
    seen: dict[str, None] = {}
    for answer in (cell or "").split(SEPARATOR):
        answer = answer.strip()
        if answer:
            seen.setdefault(answer, None)
    return list(seen)


def _records(path: str) -> Iterator[tuple[int, dict]]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:  # -sig: a byte-order mark is not in "Question"
            reader = csv.DictReader(fh)
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or ())]
            if missing:
                raise DataError(f"{path} is not a TruthfulQA CSV: missing column(s) {', '.join(missing)}")
            yield from enumerate(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read TruthfulQA CSV {path}: {exc}") from exc


def load_truthfulqa(path: str, *, max_pairs: int | None = None, split: str = "train") -> LoadResult:
    result = LoadResult(format="truthfulqa", source=Path(path).name)
    for qrow, rec in _records(path):
        if max_pairs is not None and len(result.rows) >= max_pairs:
            break
        row_id = f"{result.source}:{qrow}"
        question = (rec.get("Question") or "").strip()
        correct = split_answers(rec.get("Correct Answers"))
        incorrect = split_answers(rec.get("Incorrect Answers"))
        reason = ("empty_prompt" if not question else "no_correct_answer" if not correct
                  else "no_incorrect_answer" if not incorrect else None)
        if reason:
            result.n_read += 1
            result.add_reject(row_id, reason, question[:80])
            continue
        for i in range(max(len(correct), len(incorrect))):
            if max_pairs is not None and len(result.rows) >= max_pairs:
                break
            result.n_read += 1
            chosen, rejected = correct[i % len(correct)], incorrect[i % len(incorrect)]
            pair_id = f"{row_id}:{i}"
            if chosen == rejected:
                result.add_reject(pair_id, "identical_responses", chosen[:80])
                continue
            result.rows.append(make_row(question, chosen, rejected, result.source, pair_id))
    return result


def load_truthfulqa_mc(path: str) -> list[MCQuestion]:
    """One MCQuestion per usable question, in file order (questions without a correct or an
    incorrect answer are left out). MC1 scores ``best_answer`` against ``incorrect``; MC2 scores
    all of ``correct`` against all of ``incorrect``. A missing Best Answer falls back to the first
    correct answer."""
    out = []
    for _, rec in _records(path):
        question = (rec.get("Question") or "").strip()
        correct = split_answers(rec.get("Correct Answers"))
        incorrect = split_answers(rec.get("Incorrect Answers"))
        if not question or not correct or not incorrect:
            continue
        best = (rec.get("Best Answer") or "").strip() or correct[0]
        out.append(MCQuestion(question=question, best_answer=best, correct=correct, incorrect=incorrect))
    return out
