"""Scoring for the service, split into tokenization (per request) and the model pass (per batch).

Every item is encoded and scored exactly as :meth:`SparseRM.score` / :meth:`SparseRM.score_pairs` do (one
token group per item, its prompt computed once), so served scores equal in-process scores; batching only
changes which items share one packed forward (row-independent, float rounding only).

Queries (``POST /get_reward``, OpenRLHF's; ``POST /classify``, veRL's) are full texts. The rule, deterministic:

1. Leading pad tokens are dropped, then trailing eos/pad tokens and the text the chat template closes an
   assistant turn with (``<|im_end|>\\n`` for ChatML; OpenRLHF decodes with special tokens, veRL sends the whole
   conversation through the template).
2. If the RM uses a chat template, the query is split after the *last* occurrence of the template's
   generation marker (what ``add_generation_prompt`` appends; ``<|im_start|>assistant\\n`` for ChatML/SmolLM2):
   the part up to and including the marker is the already-templated prompt, the rest the response. The prompt
   text is tokenized as is (not templated again), so when ``query == apply_chat_template(prompt) + response
   [+ eos]`` (or the template applied to the prompt and the response as its assistant turn) the score equals
   ``score(prompt, response)``. With ``restore_bos`` (``/classify``'s ``add_special_tokens``), a prompt part
   that lacks the BOS token the template starts with gets it back: veRL strips it, expecting vLLM to add it.
3. Otherwise (no template, or no marker in the query) the whole query is the response to an empty prompt:
   the score equals ``score("", query)``.
"""
from __future__ import annotations

import math

import torch

from sparserm.model.text import TokenGroup, _bos, encode_group, messages_text, truncate_group


class Scorer:
    def __init__(self, rm):
        self.rm = rm
        self.cfg = rm.model_cfg
        self.bb = rm.backbone
        self.tok = self.bb.tokenizer
        self.templated = bool(self.cfg.chat_template and getattr(self.tok, "chat_template", None))
        self.marker = self._generation_marker() if self.templated else None
        specials = [self._turn_end() if self.templated else None] + [
            getattr(self.tok, name, None) for name in ("pad_token", "eos_token")]
        self.trailing = tuple(dict.fromkeys(s for s in specials if s))
        self.leading = (self.tok.pad_token,) if getattr(self.tok, "pad_token", None) else ()
        bos = getattr(self.tok, "bos_token", None)
        self.bos = bos if self.templated and bos and self._render(False).startswith(bos) else None

    def _render(self, add_generation_prompt: bool, messages=(("user", "x"),)) -> str:
        msgs = [{"role": r, "content": c} for r, c in messages]
        return self.tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False)

    def _generation_marker(self) -> str | None:
        with_gen, without = self._render(True), self._render(False)
        if with_gen.startswith(without) and len(with_gen) > len(without):
            return with_gen[len(without):]
        return None

    def _turn_end(self) -> str | None:
        """What the template writes after an assistant message's content (``<|im_end|>\\n`` for ChatML)."""
        mark = "SPARSERM-RESPONSE"
        try:
            text = self._render(False, (("user", "x"), ("assistant", mark)))
        except Exception:  # a template that refuses this conversation has no rule to learn here
            return None
        if mark not in text:
            return None
        return text[text.rindex(mark) + len(mark):] or None

    # ------------------------------------------------------------ encoding (cheap, per request)

    def encode(self, prompt, responses: list[str]) -> TokenGroup:
        """A prompt (string, or chat messages) with its responses, as :meth:`SparseRM.pooled_states` encodes it."""
        said = prompt if isinstance(prompt, str) else "".join(str(m.get("content") or "") for m in prompt)
        if not said.strip() and not any(r.strip() for r in responses):  # a chat template would still give tokens
            raise ValueError("the prompt and the response are both empty")
        if isinstance(prompt, str):
            group = encode_group(self.tok, prompt, list(responses), self.cfg.max_tokens, self.cfg.chat_template)
        elif self.templated:
            msgs = [{"role": m["role"], "content": m["content"]} for m in prompt]
            group = self.encode_templated(messages_text(self.tok, msgs, True), responses)
        else:  # no chat template: the messages' contents joined as one prompt string
            text = messages_text(self.tok, prompt, False)
            group = encode_group(self.tok, text, list(responses), self.cfg.max_tokens, False)
        return _check(group)

    def encode_templated(self, ptext: str, responses: list[str]) -> TokenGroup:
        """A prompt that already went through the chat template (the templated branch of ``encode_group``)."""
        prefix = self.tok(ptext, add_special_tokens=False)["input_ids"] if ptext else []
        suffixes = [self.tok(r, add_special_tokens=False)["input_ids"] for r in responses]
        return _check(truncate_group(prefix, suffixes, self.cfg.max_tokens, keep_first=_bos(self.tok, prefix)))

    def strip_query(self, query: str) -> str:
        """``query`` without the leading and trailing special tokens :meth:`split_query` drops (OpenRLHF's
        decoded queries carry their padding: the text limits apply to what remains)."""
        i, j = 0, len(query)  # positions, not slices: a query of 16k pads is not copied 16k times
        while (s := next((s for s in self.leading or () if s and query.startswith(s, i, j)), None)) is not None:
            i += len(s)
        while (s := next((s for s in self.trailing or () if s and query.endswith(s, i, j)), None)) is not None:
            j -= len(s)
        return query[i:j]

    def split_query(self, query: str) -> tuple[str | None, str]:
        """(templated prompt text or None, response) per the rule in the module docstring."""
        q = self.strip_query(query)
        if not q.strip():
            raise ValueError("the text is empty (after its padding and special tokens)")
        if self.marker and self.marker in q:
            cut = q.rindex(self.marker) + len(self.marker)
            return q[:cut], q[cut:]
        return None, q

    def encode_query(self, query: str, restore_bos: bool = False) -> TokenGroup:
        ptext, response = self.split_query(query)
        if ptext is None:
            return self.encode("", [response])
        if restore_bos and self.bos and not ptext.startswith(self.bos):
            ptext = self.bos + ptext
        return self.encode_templated(ptext, [response])

    # ------------------------------------------------------------ the model pass (per batch)

    @torch.no_grad()
    def score_groups(self, groups: list[TokenGroup]) -> list[list[float]]:
        """Scores of every response of every group, one list per group."""
        if not groups:
            return []
        pooled = self.rm.pooled_groups(groups)
        scores = self.rm.score_states(torch.cat(pooled)).tolist()
        out, i = [], 0
        for g in groups:
            out.append(scores[i: i + len(g.suffixes)])
            i += len(g.suffixes)
        return out


def _check(group: TokenGroup) -> TokenGroup:
    if any(len(group.prefix) + len(s) == 0 for s in group.suffixes):
        raise ValueError("the text is empty after tokenization")
    return group


def batch_chunks(groups: list[TokenGroup], max_batch_size: int, max_batch_tokens: int) -> list[tuple]:
    """Cut a request's groups into batch entries ``(groups, n_items, token_units)`` that each fit one batch.

    One batch is full at ``max_batch_size`` items or, when ``max_batch_tokens`` > 0, at ``max_batch_tokens``
    tokens (a group's tokens as a prefix-sharing pass computes them); ``token_units`` expresses tokens in
    items (``max_batch_size`` units = ``max_batch_tokens`` tokens) so ``@serve.batch`` can count both at once.
    A single group larger than the token budget gets a batch of its own."""
    def units(g: TokenGroup) -> float:
        if max_batch_tokens <= 0:
            return 0.0
        return max_batch_size * min(g.n_tokens_shared, max_batch_tokens) / max_batch_tokens

    out, cur, cur_units = [], [], 0.0
    for g in groups:
        u = units(g)
        if cur and (len(cur) + 1 > max_batch_size or cur_units + u > max_batch_size + 1e-9):
            out.append((cur, len(cur), cur_units))
            cur, cur_units = [], 0.0
        cur.append(g)
        cur_units += u
    if cur:
        out.append((cur, len(cur), cur_units))
    return out


def batch_size_fn(entries: list[tuple]) -> int:
    """``@serve.batch(batch_size_fn=...)``: the size of a batch of entries from :func:`batch_chunks`, in items,
    counting tokens too: full at ``max_batch_size`` items or ``max_batch_tokens`` tokens, whichever is first."""
    return max(sum(n for _, n, _ in entries), math.ceil(sum(u for _, _, u in entries) - 1e-9))
