"""Request size limits of every sparserm HTTP app (the guard's byte cap on the whole body is in :mod:`guard`).

From :class:`~sparserm.config.ServeConfig`: more than ``max_items_per_request`` items -> 413; a text longer than
``max_text_chars`` -> 413 naming the field (``overlong: reject``) or cut to its last ``max_text_chars`` characters,
the item's index reported (``overlong: truncate``; the end is kept because the reward reads the end of the
response, as the model's own left truncation does). Chat messages are limited per message content.
"""
from __future__ import annotations

from sparserm.serve.errors import ServeRequestError


def check_count(n: int, limit: int, field: str) -> None:
    if n > limit:
        raise ServeRequestError(413, f"{n} items is more than max_items_per_request={limit}", field)


def cut_text(text: str, limit: int, overlong: str, field: str) -> tuple[str, bool]:
    """``(text, False)`` within the limit, else 413 (reject) or ``(its last limit characters, True)``."""
    if len(text) <= limit:
        return text, False
    if overlong == "reject":
        raise ServeRequestError(413, f"text of {len(text)} characters is longer than max_text_chars={limit}", field)
    return text[-limit:], True


def cut_messages(messages, limit: int, overlong: str, field: str) -> tuple[list[dict], bool]:
    """Chat messages (pydantic models or dicts with ``content``) as dicts, each content limited."""
    out, cut = [], False
    for j, m in enumerate(messages):
        m = m.model_dump() if hasattr(m, "model_dump") else dict(m)
        content, c = cut_text(m["content"], limit, overlong, f"{field}.{j}.content")
        out.append({**m, "content": content})
        cut |= c
    return out, cut


def limit_items(items: list, text_fields: tuple[str, ...], list_name: str, max_items: int, max_chars: int,
                overlong: str, *, single: bool = False) -> tuple[list[dict], list[int]]:
    """Apply the limits to validated items: pydantic models whose ``text_fields`` are texts (``prompt`` may be chat
    messages), or plain strings (returned as ``{"query": text}``). ``single``: the list stands for one string
    sent on its own, so its field is ``list_name`` rather than ``list_name.0``.

    Returns plain dicts (prompt as str or list of message dicts) and the indices of truncated items."""
    check_count(len(items), max_items, list_name)
    out, truncated = [], []
    for i, item in enumerate(items):
        where = list_name if single else f"{list_name}.{i}"
        if isinstance(item, str):
            text, cut = cut_text(item, max_chars, overlong, where)
            out.append({"query": text})
        else:
            row, cut = {}, False
            for name in text_fields:
                value, field = getattr(item, name), f"{where}.{name}"
                if isinstance(value, str):
                    row[name], c = cut_text(value, max_chars, overlong, field)
                else:
                    row[name], c = cut_messages(value, max_chars, overlong, field)
                cut |= c
            out.append(row)
        if cut:
            truncated.append(i)
    return out, truncated
