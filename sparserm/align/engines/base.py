"""What every generation engine shares: sampling settings and prompt rendering."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Sampling:
    """What an engine's ``generate`` reads; no defaults here: they live in ``GenerateConfig`` (see ``of``)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    max_prompt_tokens: int

    @classmethod
    def of(cls, generate_cfg) -> "Sampling":
        """The sampling fields of a ``GenerateConfig``."""
        return cls(**{f: getattr(generate_cfg, f) for f in cls.__dataclass_fields__})

    def to_dict(self) -> dict:
        return asdict(self)


def render(tokenizer, messages: list[dict], use_chat_template: bool = True) -> list[int]:
    """Token ids of a generation prompt (chat template with the assistant turn opened, or plain text)."""
    from sparserm.model.text import messages_text

    templated = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    # a chat template writes its own special tokens; plain text gets the tokenizer's (e.g. BOS)
    return tokenizer(messages_text(tokenizer, messages, templated), add_special_tokens=not templated)["input_ids"]


def render_prompts(tokenizer, conversations: list[list[dict]], max_tokens: int,
                   use_chat_template: bool = True) -> list[list[int]]:
    """Token ids of each generation prompt within ``max_tokens`` (:func:`render_clipped`). Conversations with
    the same turns after their system messages (the two sides of a contrastive pair) keep the same window:
    the one whose system text is longest is cut, and the others take its turns."""
    import json

    siblings: dict[str, list[int]] = {}
    for i, conv in enumerate(conversations):
        siblings.setdefault(json.dumps([m for m in conv if m["role"] != "system"]), []).append(i)
    out: list[list[int] | None] = [None] * len(conversations)
    for idx in siblings.values():
        cut = {i: clip_messages(tokenizer, conversations[i], max_tokens, use_chat_template) for i in idx}
        body = min(([m for m in cut[i] if m["role"] != "system"] for i in idx),
                   key=lambda b: sum(len(m["content"]) for m in b))
        for i in idx:
            out[i] = render(tokenizer, [m for m in conversations[i] if m["role"] == "system"] + body,
                            use_chat_template)
    return out  # type: ignore[return-value]


def render_clipped(tokenizer, messages: list[dict], max_tokens: int, use_chat_template: bool = True) -> list[int]:
    """Token ids of a generation prompt within ``max_tokens``: :func:`clip_messages`, rendered."""
    return render(tokenizer, clip_messages(tokenizer, messages, max_tokens, use_chat_template), use_chat_template)


def clip_messages(tokenizer, messages: list[dict], max_tokens: int, use_chat_template: bool = True) -> list[dict]:
    """The conversation cut from its start until it renders within ``max_tokens`` (the earliest turns first,
    then the beginning of the first turn left); system messages, where the contrastive instruction sits, and
    the template's own tokens are never cut."""
    messages = [dict(m) for m in messages]
    ids = render(tokenizer, messages, use_chat_template)
    while len(ids) > max_tokens:
        body = [i for i, m in enumerate(messages) if m["role"] != "system"]
        excess = len(ids) - max_tokens
        first = messages[body[0]]
        content = tokenizer(first["content"], add_special_tokens=False)["input_ids"]
        if len(body) > 1 and len(content) <= excess:
            # a whole early turn goes, with the reply after it: the conversation still opens with a user turn
            drop = body[:2] if messages[body[0]]["role"] == "user" and len(body) > 2 else body[:1]
            messages = [m for i, m in enumerate(messages) if i not in drop]
        elif excess < len(content):
            first["content"] = _cut_start(tokenizer, content, excess)
        else:
            raise ValueError(f"max_prompt_tokens={max_tokens} leaves no room for the prompt: the system "
                             f"instruction and template alone take {len(ids) - len(content)} tokens")
        ids = render(tokenizer, messages, use_chat_template)
    return messages


def _cut_start(tokenizer, content: list[int], k: int) -> str:
    """The text of ``content`` without its first ``k`` tokens or more: a cut inside a character (a byte-level
    token) leaves replacement characters, which are dropped, and the text re-encodes to fewer tokens than
    ``content`` (else the cut moves on), so every cut shortens the prompt."""
    for start in range(k, len(content)):
        text = tokenizer.decode(content[start:]).lstrip().lstrip("\ufffd").lstrip()
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) < len(content):
            return text
    return ""


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(ids, attention mask) [B, T] of prompts padded on the left, so every prompt ends at the last column."""
    import torch

    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, n - len(p):] = 1
    return ids, mask
