"""One chat choice's text as its tokens arrive: incremental detokenization, stop strings and the token budget.

The text is the decoded tokens (special tokens skipped) with leading and trailing whitespace stripped, as
``SteeredOutput.text``; with stop strings it ends before the first occurrence of any of them (OpenAI's rule: the
stop string itself is not returned). :meth:`TextTracker.add` returns the new text that is safe to send, holding back
trailing whitespace, an incomplete UTF-8 character and any tail that may still become a stop string, so the deltas
of a stream join to exactly :attr:`TextTracker.text`, the non-streamed content.
"""
from __future__ import annotations


class TextTracker:
    def __init__(self, tokenizer, max_tokens: int, stop: tuple[str, ...] = ()):
        self.tokenizer, self.max_tokens, self.stop = tokenizer, max_tokens, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # what has been released (sent, when streaming)
        self.hit_stop = False  # ended by a stop string
        self.done = False  # ended: a stop string, or max_tokens tokens

    def add(self, token_id: int) -> str:
        """Take the next token; returns the text it releases (may be empty). Sets ``done`` at a stop string or at
        ``max_tokens`` tokens."""
        self.ids.append(token_id)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.hit_stop = self.done = True
            return self._release(full[:cut].rstrip())
        if len(self.ids) >= self.max_tokens:
            self.done = True
            return self._release(full.rstrip())
        safe = full.rstrip("\ufffd")  # a character whose bytes have not all arrived
        return self._release(safe[: len(safe) - self._stop_prefix(safe)].rstrip())

    def finish(self) -> str:
        """The rest of the text once generation ended (EOS, or the engine's own limit)."""
        if self.done or not self.ids:
            return ""
        self.done = True
        return self._release(self.tokenizer.decode(self.ids, skip_special_tokens=True).strip())

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is the start of a stop string (it may still become one)."""
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)

    def _release(self, visible: str) -> str:
        # a decode that rewrote text already sent (rare tokenizer clean-ups) cannot be taken back: keep what was sent
        if len(visible) <= len(self.text) or not visible.startswith(self.text):
            return ""
        delta, self.text = visible[len(self.text):], visible
        return delta
