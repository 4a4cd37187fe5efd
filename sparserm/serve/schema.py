"""Request/response schema of the reward-model service (pydantic; FastAPI publishes it at ``/openapi.json``
and ``/docs``) and the request limits.

Limits (from :class:`~sparserm.serve.config.ServeConfig`): more than ``max_items_per_request`` items -> 413;
a text field longer than ``max_text_chars`` -> 413 naming the field (``overlong: reject``) or cut to its last
``max_text_chars`` characters, the item's index listed in the response's ``truncated`` (``overlong: truncate``;
the end is kept because the reward reads the end of the response, as the model's own left truncation does).
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ServeRequestError(ValueError):
    """A bad request: ``status`` (4xx), a message and the offending field (dotted path, e.g. ``items.3.response``)."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(f"{status} {message}" + (f" (field {field})" if field else ""))
        self.status, self.message, self.field = status, message, field

    def __reduce__(self):  # picklable across Ray (handle callers get the same error)
        return (ServeRequestError, (self.status, self.message, self.field))

    def body(self) -> dict:
        return {"detail": self.message, "field": self.field}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str


Prompt = str | list[ChatMessage]


class ScoreItem(_Strict):
    prompt: Prompt = Field(description="A prompt string (templated like the training data), or chat messages "
                                       "rendered with the backbone's chat template and a generation prompt")
    response: str


class ScoreRequest(_Strict):
    items: list[ScoreItem]


class ScoreResponse(BaseModel):
    scores: list[float]
    model: str
    truncated: list[int] = Field(default_factory=list, description="indices of items whose texts were cut")


class PairItem(_Strict):
    prompt: Prompt
    chosen: str
    rejected: str


class CompareRequest(_Strict):
    pairs: list[PairItem]


class CompareResponse(BaseModel):
    margins: list[float] = Field(description="score(chosen) - score(rejected), per pair")
    chosen_scores: list[float]
    rejected_scores: list[float]
    model: str
    truncated: list[int] = Field(default_factory=list)


class RewardRequest(BaseModel):
    """OpenRLHF's remote-RM request: ``query`` holds full texts (prompt + response, chat template applied).
    OpenRLHF also sends ``prompts`` and ``labels``; they are accepted and not used."""

    model_config = ConfigDict(extra="allow")
    query: list[str]
    prompts: list[Any] | None = None
    labels: list[Any] | None = None


class RewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]  # OpenRLHF >= 0.8 reads "scores" (falls back to "rewards")
    extra_logs: dict = Field(default_factory=dict)
    truncated: list[int] = Field(default_factory=list)


class HealthResponse(BaseModel):
    status: str
    model: str


# ---------------------------------------------------------------- limits


def _cut(text: str, limit: int, overlong: str, field: str) -> tuple[str, bool]:
    if len(text) <= limit:
        return text, False
    if overlong == "reject":
        raise ServeRequestError(413, f"text of {len(text)} characters is longer than max_text_chars={limit}", field)
    return text[-limit:], True


def _cut_prompt(prompt, limit: int, overlong: str, field: str):
    if isinstance(prompt, str):
        return _cut(prompt, limit, overlong, field)
    out, cut = [], False
    for j, m in enumerate(prompt):
        content, c = _cut(m.content, limit, overlong, f"{field}.{j}.content")
        out.append({**m.model_dump(), "content": content})
        cut |= c
    return out, cut


def limit_items(items: list, text_fields: tuple[str, ...], list_name: str, max_items: int, max_chars: int,
                overlong: str) -> tuple[list[dict], list[int]]:
    """Apply the limits to validated items (pydantic models or plain strings for ``query``).

    Returns plain dicts (prompt as str or list of message dicts) and the indices of truncated items."""
    if len(items) > max_items:
        raise ServeRequestError(413, f"{len(items)} items is more than max_items_per_request={max_items}", list_name)
    out, truncated = [], []
    for i, item in enumerate(items):
        if isinstance(item, str):
            text, cut = _cut(item, max_chars, overlong, f"{list_name}.{i}")
            out.append({"query": text})
        else:
            row, cut = {}, False
            for name in text_fields:
                value = getattr(item, name)
                if name == "prompt":
                    row[name], c = _cut_prompt(value, max_chars, overlong, f"{list_name}.{i}.{name}")
                else:
                    row[name], c = _cut(value, max_chars, overlong, f"{list_name}.{i}.{name}")
                cut |= c
            out.append(row)
        if cut:
            truncated.append(i)
    return out, truncated


def error_field(loc: tuple | list) -> str:
    """``("body", "items", 0, "prompt", "str")`` -> ``"items.0.prompt"`` (drops the body marker and union tags)."""
    parts = [str(p) for p in loc if p != "body"]
    parts = [p for p in parts if p not in ("str", "list[ChatMessage]") and not p.startswith("function-")]
    return ".".join(parts) or "body"
