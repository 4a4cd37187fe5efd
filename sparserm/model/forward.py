"""The truncated forward: per-token residual streams of one or several layers from one pass, pooled.

``packed_states`` runs many prompts and their responses in one batched forward. With ``share_prefix``
each group (a prompt and its responses) is one row: the prompt once, then every response, under a tree
attention mask (a response sees the prompt and itself, never its sibling) with position ids that restart
after the prompt for each response, so every text gets exactly the states of its own full sequence while
the prompt is computed once. Without it every text is its own row. Rows are right-padded to one length;
pads only attend to themselves and nothing attends to them. Both give the states of separate batch-1
passes up to float rounding (tested).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparserm.model.backbone import Backbone
from sparserm.model.text import TokenGroup

POOLINGS = ("last", "mean_response", "mean")


@dataclass
class TextStates:
    """Residual states of one text: ``states[layer]`` is [T, d] over the whole (truncated) sequence."""

    token_ids: list[int]
    response_start: int  # index of the first response token
    states: dict[int, torch.Tensor]

    def pooled(self, layer: int, pooling: str) -> torch.Tensor:
        return pool(self.states[layer], self.response_start, pooling)


def pool(states: torch.Tensor, response_start: int, pooling: str) -> torch.Tensor:
    """``last``: the last token of the response itself (never a chat template's trailing tokens, which we
    do not append: in SmolLM2 the template's newline carries a massive activation); ``mean_response``:
    mean over response tokens; ``mean``: mean over all tokens."""
    if pooling == "last":
        return states[-1]
    if pooling == "mean_response":
        resp = states[response_start:]
        return resp.mean(0) if len(resp) else states[-1]
    if pooling == "mean":
        return states.mean(0)
    raise ValueError(f"model.pooling={pooling!r} is invalid: expected one of {POOLINGS}")


def _one_row(g: TokenGroup, share_prefix: bool) -> bool:
    """Whether the group is packed into one row (a shared prompt and more than one response)."""
    return share_prefix and len(g.suffixes) > 1 and bool(g.prefix)


def _rows(groups: list[TokenGroup], share_prefix: bool):
    """Per row: (token ids, position ids, segment ids) and, per text, (row, offsets of its tokens)."""
    rows, texts = [], []
    for g in groups:
        if _one_row(g, share_prefix):
            n = len(g.prefix)
            ids, pos, seg = list(g.prefix), list(range(n)), [0] * n
            group_texts = []
            for j, suffix in enumerate(g.suffixes):
                at = len(ids)
                ids += suffix
                pos += range(n, n + len(suffix))
                seg += [j + 1] * len(suffix)
                group_texts.append((len(rows), list(range(n)) + list(range(at, at + len(suffix)))))
            rows.append((ids, pos, seg))
        else:
            group_texts = []
            for j in range(len(g.suffixes)):
                ids = g.sequence(j)
                group_texts.append((len(rows), list(range(len(ids)))))
                rows.append((ids, list(range(len(ids))), [0] * len(ids)))
        texts.append(group_texts)
    return rows, texts


def tree_mask(segments: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, N, N] mask: query q sees key k <= q when k is in the prompt (segment 0) or in q's own
    segment; pads (``valid`` False) see only themselves, so no row of the softmax is empty."""
    n = segments.shape[1]
    idx = torch.arange(n, device=segments.device)
    causal = idx[None, :, None] >= idx[None, None, :]
    same = (segments[:, None, :] == 0) | (segments[:, None, :] == segments[:, :, None])
    allowed = causal & same & valid[:, None, :] & valid[:, :, None]
    allowed |= torch.eye(n, dtype=torch.bool, device=segments.device)[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def packed_states(backbone: Backbone, groups: list[TokenGroup], share_prefix: bool = True,
                  max_batch_tokens: int | None = None) -> list[list[TextStates]]:
    """TextStates of every response of every group, in order (see the module docstring): one batched forward,
    or, with ``max_batch_tokens``, one per run of groups that fits that padded size (``token_batches``),
    taking the groups shortest first so each forward pads little."""
    if max_batch_tokens is None:
        return _packed_forward(backbone, groups, share_prefix)
    order = sorted(range(len(groups)), key=lambda i: _row_shape(groups[i], share_prefix)[1])
    ordered = [groups[i] for i in order]
    out: list = [None] * len(groups)
    for idx in token_batches(ordered, max_batch_tokens, share_prefix):
        for i, states in zip(idx, _packed_forward(backbone, [ordered[i] for i in idx], share_prefix)):
            out[order[i]] = states
    return out


@torch.inference_mode()
def _packed_forward(backbone: Backbone, groups: list[TokenGroup], share_prefix: bool) -> list[list[TextStates]]:
    if not groups:
        return []
    rows, texts = _rows(groups, share_prefix)
    n = max(len(r[0]) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    pos = torch.zeros(len(rows), n, dtype=torch.long)
    seg = torch.full((len(rows), n), -1, dtype=torch.long)
    for i, (r_ids, r_pos, r_seg) in enumerate(rows):
        ids[i, : len(r_ids)], pos[i, : len(r_ids)], seg[i, : len(r_ids)] = (
            torch.tensor(r_ids), torch.tensor(r_pos), torch.tensor(r_seg))
    dev = backbone.device
    dtype = next(backbone.model.parameters()).dtype
    mask = tree_mask(seg.to(dev), (seg >= 0).to(dev), dtype)
    out = backbone.model(input_ids=ids.to(dev), position_ids=pos.to(dev), attention_mask=mask,
                         use_cache=False, output_hidden_states=True)
    # hidden_states[i + 1] is the output of block i; the final norm is the identity after truncation.
    hidden = {layer: out.hidden_states[layer + 1].float() for layer in backbone.layers}
    result = []
    for g, group_texts in zip(groups, texts):
        states = []
        for j, (row, offsets) in enumerate(group_texts):
            at = torch.as_tensor(offsets, device=dev)
            states.append(TextStates(g.sequence(j), len(g.prefix),
                                     {layer: h[row].index_select(0, at) for layer, h in hidden.items()}))
        result.append(states)
    return result


def group_states(backbone: Backbone, group: TokenGroup, share_prefix: bool = True) -> list[TextStates]:
    """TextStates of one group's responses (a batch of one group)."""
    return packed_states(backbone, [group], share_prefix)[0]


def _row_shape(g: TokenGroup, share_prefix: bool) -> tuple[int, int]:
    """(rows, longest row) that group ``g`` takes in a packed forward."""
    if _one_row(g, share_prefix):
        return 1, g.n_tokens_shared
    return len(g.suffixes), max(len(g.sequence(j)) for j in range(len(g.suffixes)))


def token_batches(groups: list[TokenGroup], max_tokens: int, share_prefix: bool = True) -> list[list[int]]:
    """Indices of ``groups`` in consecutive runs whose padded packed size (rows x longest row) stays within
    ``max_tokens`` (a group larger than that is a batch of its own); order is kept."""
    batches, current, rows, longest = [], [], 0, 0
    for i, g in enumerate(groups):
        g_rows, g_len = _row_shape(g, share_prefix)
        if current and max(longest, g_len) * (rows + g_rows) > max_tokens:
            batches.append(current)
            current, rows, longest = [], 0, 0
        current.append(i)
        rows, longest = rows + g_rows, max(longest, g_len)
    if current:
        batches.append(current)
    return batches
