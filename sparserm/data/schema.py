"""The one preference-row schema shared by every loader.

A preference row is a plain dict::

    {"prompt": str, "chosen": str, "rejected": str, "source": str, "row_id": str}

``source`` is the file's base name (or the hub dataset id); ``row_id`` is ``"<source>:<n>"`` with
``n`` the 0-based line/row number in the file (TruthfulQA adds the pair index:
``"truthfulqa.csv:<question row>:<pair>"``; hub rows are ``"<id>:<split>:<n>"``).

A reject is ``{"row_id", "source", "reason", "detail"}``; ``reason`` is one of ``REASONS``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

ROW_KEYS = ("prompt", "chosen", "rejected", "source", "row_id")

REASONS = (
    "invalid_json",  # a JSONL line that does not parse, or is not a JSON object
    "undecodable_bytes",  # a line that is not valid UTF-8
    "missing_field",  # a required field is absent (or null)
    "non_text_field",  # a required field is not a string
    "empty_prompt",  # the prompt is empty or whitespace
    "empty_response",  # a response is empty or whitespace: not a valid preference
    "identical_responses",  # chosen == rejected: no preference to learn
    "no_assistant_turn",  # HH dialogue without "\n\nAssistant:"
    "prefix_mismatch",  # HH dialogues that differ before their last Assistant turn
    "no_correct_answer",  # TruthfulQA question without a correct answer
    "no_incorrect_answer",  # TruthfulQA question without an incorrect answer
)

_DETAIL_CHARS = 200


class DataError(ValueError):
    """A data file that cannot be read at all: missing path, unknown format, unreadable container."""


@dataclass
class LoadResult:
    rows: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    n_read: int = 0  # records looked at (non-blank lines, table rows, pairs formed for TruthfulQA)
    format: str = ""  # the resolved format (never "auto")
    source: str = ""

    def reason_counts(self) -> dict[str, int]:
        """``{reason: count}`` over the rejects, most frequent first."""
        return dict(Counter(r["reason"] for r in self.rejects).most_common())

    def add_reject(self, row_id: str, reason: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        if len(detail) > _DETAIL_CHARS:
            detail = detail[:_DETAIL_CHARS] + "..."
        self.rejects.append({"row_id": row_id, "source": self.source, "reason": reason, "detail": detail})


def make_row(prompt: str, chosen: str, rejected: str, source: str, row_id: str) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "source": source, "row_id": row_id}
