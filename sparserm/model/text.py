"""From (prompt, responses) to token ids: chat templates, one shared prompt, left truncation.

A prompt and its responses are tokenized as one *group*: the prompt once (through the tokenizer's chat
template when it has one), each response separately, appended. Truncation is from the left and per
group: prompt tokens are dropped first (the response end is what the reward reads), so every text of a
group keeps the same prompt window and can share its KV cache; only a response longer than the whole
budget loses its own beginning. A lone text is a group of one, so scoring it alone gives exactly the
features it had in training unless its pair partner forced a shorter prompt window.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_TURN = re.compile(r"\n\n(Human|Assistant):")
# in every key of what was computed from encoded texts (activation caches, reference log-probs, maps): 2 keeps the
# text before an HH dialogue's first turn and a cut prompt's last token (1 dropped both)
ENCODING_VERSION = 2


def to_messages(prompt: str) -> list[dict]:
    """HH-RLHF style dialogues ("\\n\\nHuman: ... \\n\\nAssistant:") become chat turns (text before the
    first turn, an instruction say, opens the first user turn); anything else is a single user message."""
    text = "\n\n" + prompt.lstrip("\n")
    if not _TURN.search(text):
        return [{"role": "user", "content": prompt}]
    parts = _TURN.split(text)
    messages = []
    for role, content in zip(parts[1::2], parts[2::2]):
        content = content.strip()
        if not content and role == "Assistant":
            continue  # the trailing "Assistant:" that opens the response
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content})
    preamble = parts[0].strip()
    if preamble and messages and messages[0]["role"] == "user":
        messages[0] = {"role": "user", "content": f"{preamble}\n\n{messages[0]['content']}".strip()}
    elif preamble:
        messages.insert(0, {"role": "user", "content": preamble})
    return messages or [{"role": "user", "content": prompt}]


@dataclass
class TokenGroup:
    """Token ids of one prompt and its responses after truncation."""

    prefix: list[int]  # shared prompt tokens
    suffixes: list[list[int]]  # response tokens, one list per response

    def sequence(self, i: int) -> list[int]:
        return self.prefix + self.suffixes[i]

    @property
    def n_tokens_total(self) -> int:
        """Tokens of every text counted separately (the work an unshared pass does)."""
        return sum(len(self.prefix) + len(s) for s in self.suffixes)

    @property
    def n_tokens_shared(self) -> int:
        """Tokens a prefix-sharing pass computes."""
        return len(self.prefix) + sum(len(s) for s in self.suffixes)


def messages_text(tokenizer, messages: list[dict], use_chat_template: bool) -> str:
    """Chat messages as the prompt text: the chat template with the assistant turn opened, or, without a
    template, the contents joined by blank lines. A template that refuses a system turn (Gemma-2) gets the
    system text at the start of the first user turn instead."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja's TemplateError: e.g. Gemma-2's "System role not supported"
            if not messages or messages[0]["role"] != "system" or len(messages) < 2:
                raise
            merged = [{"role": messages[1]["role"], "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"},
                      *messages[2:]]
            try:
                return tokenizer.apply_chat_template(merged, add_generation_prompt=True, tokenize=False)
            except Exception:
                raise exc from None
    return "\n\n".join(m["content"] for m in messages)


def prompt_text(tokenizer, prompt: str, use_chat_template: bool) -> str:
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return messages_text(tokenizer, to_messages(prompt), True)
    return prompt


def encode_group(tokenizer, prompt: str, responses: list[str], max_tokens: int,
                 use_chat_template: bool = True) -> TokenGroup:
    templated = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    ptext = prompt_text(tokenizer, prompt, use_chat_template)
    # A chat template writes its own special tokens; a raw prompt gets the tokenizer's (e.g. BOS).
    prefix = tokenizer(ptext, add_special_tokens=not templated)["input_ids"] if ptext else []
    sep = "" if templated or not ptext or ptext[-1].isspace() else " "
    suffixes = [tokenizer(sep + r, add_special_tokens=False)["input_ids"] for r in responses]
    return truncate_group(prefix, suffixes, max_tokens, keep_first=_bos(tokenizer, prefix))


def _bos(tokenizer, prefix: list[int]) -> int:
    bos = getattr(tokenizer, "bos_token_id", None)
    return 1 if bos is not None and prefix[:1] == [bos] else 0


def truncate_group(prefix: list[int], suffixes: list[list[int]], max_tokens: int, keep_first: int = 0) -> TokenGroup:
    longest = max((len(s) for s in suffixes), default=0)
    over = len(prefix) + longest - max_tokens
    if over > 0:
        head, body = prefix[:keep_first], prefix[keep_first:]
        # at least one prompt token stays (the last, where no BOS is kept): the first response token's log-prob
        # is read at the position before it
        prefix = head + body[min(over, len(body) - (0 if head else 1)):]
    room = max_tokens - len(prefix)  # >= max_tokens - max(keep_first, 1) > 0
    suffixes = [s[-room:] if len(s) > room else s for s in suffixes]
    return TokenGroup(prefix=list(prefix), suffixes=[list(s) for s in suffixes])
