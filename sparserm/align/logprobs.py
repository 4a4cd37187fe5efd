"""Log-probabilities of responses under a causal LM: the one computation DPO and every evaluation share.

``encode_batch`` turns token groups (one prompt, several responses) into a left-padded batch with a
response mask; ``response_logprobs`` sums (or averages) the log-probs of the response tokens and counts the
tokens, computing the LM head only over the last positions where responses live. ``group_logprobs`` scores
the responses of one prompt with the prompt run once and its KV cache repeated over the responses (MC
options, HH pairs), equal to the batched computation up to float rounding (tested).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparserm.model.text import TokenGroup


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # [B, T] left-padded
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    response_mask: torch.Tensor  # [B, T] 1 on response tokens
    n_response: int  # the longest response; logits are needed for the last n_response + 1 positions

    def to(self, device) -> "SequenceBatch":
        return SequenceBatch(self.input_ids.to(device), self.attention_mask.to(device),
                             self.position_ids.to(device), self.response_mask.to(device), self.n_response)


def encode_batch(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> SequenceBatch:
    """``sequences``: (prompt ids, response ids) per row. Left padding keeps every response at the end."""
    if not sequences:
        raise ValueError("encode_batch: no sequences")
    for i, (_, resp) in enumerate(sequences):
        if not resp:
            raise ValueError(f"encode_batch: row {i} has an empty response")
    n = max(len(p) + len(r) for p, r in sequences)
    ids = torch.full((len(sequences), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), n, dtype=torch.long)
    resp_mask = torch.zeros(len(sequences), n, dtype=torch.long)
    for i, (prompt, resp) in enumerate(sequences):
        seq = prompt + resp
        ids[i, n - len(seq):] = torch.tensor(seq)
        mask[i, n - len(seq):] = 1
        resp_mask[i, n - len(resp):] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return SequenceBatch(ids, mask, pos, resp_mask, max(len(r) for _, r in sequences))


def groups_to_sequences(groups: list[TokenGroup], eos_id: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Every (prompt, response) of the groups in order; ``eos_id`` is appended to each response."""
    tail = [eos_id] if eos_id is not None else []
    return [(g.prefix, s + tail) for g in groups for s in g.suffixes]


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position, from logits [.., V] and targets [..]."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


# Logits of one chunk of response positions in the memory-saving path: this many elements ([positions, vocab])
# at a time, about 16 MB in fp32; a 49k vocabulary makes that 85 positions.
LOGIT_CHUNK_ELEMENTS = 1 << 22


def chunked_token_logprobs(head, h: torch.Tensor, targets: torch.Tensor, vocab: int,
                           chunk_elements: int = LOGIT_CHUNK_ELEMENTS) -> torch.Tensor:
    """log p(target) [N] float32 of each row of ``h`` [N, d] (final hidden states) under ``head`` (hidden ->
    logits over ``vocab`` tokens), a chunk of rows at a time. With gradients on, each chunk's logits are recomputed in backward
    (``torch.utils.checkpoint``) instead of kept: the [N, V] logits, their log-softmax and its gradient never
    exist at once, only one chunk's. Equal to ``token_logprobs(head(h), targets)`` up to float rounding."""
    from torch.utils.checkpoint import checkpoint

    def chunk_lp(hc, tc):
        return token_logprobs(head(hc), tc)

    if h.shape[0] == 0:
        return h.new_zeros(0, dtype=torch.float32)
    step = max(1, chunk_elements // vocab)
    grad = torch.is_grad_enabled() and h.requires_grad
    parts = [checkpoint(chunk_lp, h[i:i + step], targets[i:i + step], use_reentrant=False) if grad
             else chunk_lp(h[i:i + step], targets[i:i + step]) for i in range(0, h.shape[0], step)]
    return torch.cat(parts)


def response_logprobs(model, batch: SequenceBatch, average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum (``average``: mean) over response tokens of log p(token | everything before it), [B] float32, and
    the response token counts [B] (float32, exact: counted in integers), as ``group_logprobs`` returns them."""
    from sparserm.align.pair_forward import forward_batch

    lp, counts, _, _ = forward_batch(model, batch)
    return (lp / counts.clamp(min=1) if average else lp), counts


@torch.no_grad()
def group_logprobs(model, group: TokenGroup, prefix_cache=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs [n] and token counts [n] of each response of ``group`` (prompt run once).

    ``prefix_cache`` (optional): an object with ``ids`` (tokens that ``group.prefix`` starts with) and
    ``fresh(model)`` (a new cache holding their key/value states), so only the rest of the prefix runs."""
    from transformers import DynamicCache

    if not group.prefix:
        raise ValueError("group_logprobs: the prompt is empty")
    device = next(model.parameters()).device
    n = len(group.suffixes)
    lengths = torch.tensor([len(s) for s in group.suffixes])
    if n == 0 or int(lengths.min()) == 0:
        raise ValueError("group_logprobs: every response needs at least one token")
    done = 0
    cache = DynamicCache(config=model.config)
    if prefix_cache is not None and len(group.prefix) > len(prefix_cache.ids) \
            and group.prefix[: len(prefix_cache.ids)] == prefix_cache.ids:
        done, cache = len(prefix_cache.ids), prefix_cache.fresh(model)
    prefix = torch.tensor([group.prefix[done:]], device=device)
    first = model(input_ids=prefix, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]  # [V]
    cache.batch_repeat_interleave(n)
    L = int(lengths.max())
    ids = torch.zeros(n, L, dtype=torch.long)
    mask = torch.zeros(n, L, dtype=torch.long)
    for i, s in enumerate(group.suffixes):  # right padding: real tokens never see the pads after them
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    full_mask = torch.cat([torch.ones(n, len(group.prefix), dtype=torch.long), mask], 1)
    ids, mask, full_mask = ids.to(device), mask.to(device), full_mask.to(device)
    logits = model(input_ids=ids, attention_mask=full_mask, cache=cache, use_cache=True).logits  # [n, L, V]
    logits = torch.cat([first.expand(n, 1, -1), logits[:, :-1]], 1)
    lp = (token_logprobs(logits, ids) * mask.to(logits.dtype)).sum(1)
    return lp.float().cpu(), lengths.float()


def response_entropy(model, group: TokenGroup) -> float:
    """Mean over the first response of ``group`` of the entropy (nats, full softmax) of the model's next-token
    distribution at each position predicting a response token (an empty response: at the position after the
    prompt)."""
    device = next(model.parameters()).device
    resp = group.suffixes[0]
    ids = torch.tensor([group.prefix + resp], device=device)
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(resp) + 1).logits[0]
    logits = logits[:-1] if resp else logits[-1:]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())
