"""What every generation engine shares: sampling settings and prompt rendering."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Sampling:
    """What an engine's ``generate`` reads; no defaults here: they live in ``AlignConfig`` (see ``of``)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    max_prompt_tokens: int

    @classmethod
    def of(cls, align_cfg) -> "Sampling":
        """The sampling fields of an ``AlignConfig``."""
        return cls(**{f: getattr(align_cfg, f) for f in cls.__dataclass_fields__})

    def to_dict(self) -> dict:
        return asdict(self)


def render(tokenizer, messages: list[dict], use_chat_template: bool = True) -> list[int]:
    """Token ids of a generation prompt (chat template with the assistant turn opened, or plain text)."""
    from sparserm.model.text import messages_text

    templated = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    # a chat template writes its own special tokens; plain text gets the tokenizer's (e.g. BOS)
    return tokenizer(messages_text(tokenizer, messages, templated), add_special_tokens=not templated)["input_ids"]


def clip_left(ids: list[int], max_tokens: int) -> list[int]:
    return ids[-max_tokens:] if len(ids) > max_tokens else ids
