"""What every generation engine shares: sampling settings and prompt rendering."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 0.95
    max_prompt_tokens: int = 96

    def to_dict(self) -> dict:
        return asdict(self)


def render(tokenizer, messages: list[dict], use_chat_template: bool = True) -> list[int]:
    """Token ids of a generation prompt (chat template with the assistant turn opened, or plain text)."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "\n\n".join(m["content"] for m in messages)
    return tokenizer(text)["input_ids"]


def clip_left(ids: list[int], max_tokens: int) -> list[int]:
    return ids[-max_tokens:] if len(ids) > max_tokens else ids
