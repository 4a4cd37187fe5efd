"""The truncated forward: per-token residual streams of one or several layers from one pass, pooled.

``group_states`` runs one prompt and its responses. With ``share_prefix`` the prompt runs once and each
response continues from its KV cache (the cache is cropped back between responses); without it every
text runs in full. Both give the same states up to float rounding (tested).
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


def _run(backbone: Backbone, ids: list[int], cache=None):
    x = torch.tensor([ids], device=backbone.device)
    out = backbone.model(input_ids=x, cache=cache, use_cache=cache is not None, output_hidden_states=True)
    # hidden_states[i + 1] is the output of block i; the final norm is the identity after truncation.
    return {layer: out.hidden_states[layer + 1][0].float() for layer in backbone.layers}


@torch.inference_mode()
def group_states(backbone: Backbone, group: TokenGroup, share_prefix: bool = True) -> list[TextStates]:
    n_prefix = len(group.prefix)
    if not share_prefix or n_prefix == 0 or len(group.suffixes) == 1:
        outs = []
        for i in range(len(group.suffixes)):
            ids = group.sequence(i)
            states = _run(backbone, ids)
            outs.append(TextStates(ids, n_prefix, states))
        return outs
    from transformers import DynamicCache

    cache = DynamicCache(config=backbone.model.config)
    prefix_states = _run(backbone, group.prefix, cache)  # the cache object fills in place
    outs = []
    for suffix in group.suffixes:
        if suffix:
            suffix_states = _run(backbone, suffix, cache)
            cache.crop(-len(suffix))  # back to the prompt alone for the next response
            states = {layer: torch.cat([prefix_states[layer], suffix_states[layer]]) for layer in backbone.layers}
        else:
            states = prefix_states
        outs.append(TextStates(group.prefix + suffix, n_prefix, states))
    return outs


@torch.inference_mode()
def batch_states(backbone: Backbone, sequences: list[list[int]]) -> list[dict[int, torch.Tensor]]:
    """Unshared, padded batch forward (right padding: real tokens never attend to the pads after them).
    The path for accelerators, where batching pays; on CPU it buys nothing over batch 1."""
    n = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), n, dtype=torch.long)
    mask = torch.zeros(len(sequences), n, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    out = backbone.model(input_ids=ids.to(backbone.device), attention_mask=mask.to(backbone.device),
                         output_hidden_states=True)
    return [{layer: out.hidden_states[layer + 1][i, : len(s)].float() for layer in backbone.layers}
            for i, s in enumerate(sequences)]
