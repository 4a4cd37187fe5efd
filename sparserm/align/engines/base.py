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


def render_clipped(tokenizer, messages: list[dict], max_tokens: int, use_chat_template: bool = True) -> list[int]:
    """Token ids of a generation prompt within ``max_tokens``. The conversation is cut from its start (the
    earliest turns first, then the beginning of the first turn left); system messages, where the
    contrastive instruction sits, and the template's own tokens are never cut."""
    messages = [dict(m) for m in messages]
    ids = render(tokenizer, messages, use_chat_template)
    while len(ids) > max_tokens:
        body = [i for i, m in enumerate(messages) if m["role"] != "system"]
        excess = len(ids) - max_tokens
        first = messages[body[0]]
        content = tokenizer(first["content"], add_special_tokens=False)["input_ids"]
        if len(body) > 1 and len(content) <= excess:
            del messages[body[0]]  # a whole early turn goes
        elif excess < len(content):
            first["content"] = tokenizer.decode(content[excess:]).lstrip()
        else:
            raise ValueError(f"max_prompt_tokens={max_tokens} leaves no room for the prompt: the system "
                             f"instruction and template alone take {len(ids) - len(content)} tokens")
        ids = render(tokenizer, messages, use_chat_template)
    return ids
