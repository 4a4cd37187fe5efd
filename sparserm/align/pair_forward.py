"""One forward of a micro-batch of preference pairs (chosen and rejected rows together) that returns what a
preference objective reads: the summed response log-probs and token counts (always, :class:`PairStats`),
per-token log-distributions over the vocabulary at the response positions (``"token"``: TDPO's sequential
KL), and SAE activations at layer L mean-pooled over each response's own tokens (``"features"``: FPO).

The features are read from the residual stream after decoder block L (a forward hook on the block, so the
state is the one the SAE was trained on, before any final norm; the hidden states a model returns end with
the final norm applied) at the positions of the response tokens, encoded by the SAE with gradients flowing
into the model (the SAE's own weights stay frozen), and averaged over the response's real tokens, never
the padding. The reference cache (``sparserm.fpo.reference_cache``) and the trainer call this same function,
so what is cached is exactly what the online computation gives.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass

import torch

from sparserm.align.logprobs import SequenceBatch, chunked_token_logprobs, encode_batch
from sparserm.align.objectives import PairStats

NEEDS = ("token", "features")  # beyond the PairStats every forward returns


@dataclass
class TokenDists:
    """Per response row (chosen rows, then rejected): log-softmax over the vocabulary [R, T, V] at the T last
    positions (each predicting a response token) and the mask [R, T] of real response tokens."""

    logp: torch.Tensor
    mask: torch.Tensor

    def halves(self) -> tuple["TokenDists", "TokenDists"]:
        b = self.logp.shape[0] // 2
        return TokenDists(self.logp[:b], self.mask[:b]), TokenDists(self.logp[b:], self.mask[b:])


@dataclass
class PairForward:
    """What one forward gives an objective, per pair of the micro-batch."""

    stats: PairStats
    tokens: TokenDists | None = None  # "token"
    chosen_features: torch.Tensor | None = None  # "features": [B, d_sae] pooled SAE activations of y_w
    rejected_features: torch.Tensor | None = None  # ... and of y_l


def unwrap_causal_lm(model):
    """The transformers causal LM inside a DeepSpeed engine and/or a peft model."""
    m = getattr(model, "module", model)  # DeepSpeed engine
    return m.get_base_model() if hasattr(m, "get_base_model") else m  # peft


def block(model, layer: int) -> torch.nn.Module:
    from sparserm.model.backbone import BackboneError, base_model, decoder_layers

    blocks = decoder_layers(base_model(unwrap_causal_lm(model)))
    if not 0 <= layer < len(blocks):
        raise BackboneError(f"layer {layer} is out of range: the model has {len(blocks)} blocks")
    return blocks[layer]


@contextlib.contextmanager
def residual_after(model, layer: int):
    """Yields a dict whose ``"h"`` holds the output of block ``layer`` ([B, T, d]) after a forward."""
    seen: dict = {}

    def hook(_module, _inputs, output):
        seen["h"] = output[0] if isinstance(output, tuple) else output

    handle = block(model, layer).register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def pooled_features(h: torch.Tensor, mask: torch.Tensor, sae) -> torch.Tensor:
    """SAE activations of the masked positions of ``h`` [B, T, d], averaged per row over its masked
    positions: [B, d_sae] float32. Only response positions are encoded; gradients reach ``h``."""
    rows, cols = mask.nonzero(as_tuple=True)
    enc = sae.sae
    f = enc.encode(h[rows, cols].to(enc.W_dec.dtype)).float()  # [N, d_sae]
    out = torch.zeros(h.shape[0], f.shape[1], dtype=f.dtype, device=f.device).index_add(0, rows, f)
    return out / mask.sum(1, keepdim=True).clamp(min=1).to(out.dtype)


def output_head(model):
    """hidden -> logits as the causal LM computes them: its output embeddings, then Gemma-2's final logit
    soft-capping where the config has one. ``forward_batch`` checks it against the model's own logits."""
    lm = unwrap_causal_lm(model)
    proj, cap = lm.get_output_embeddings(), getattr(lm.config, "final_logit_softcapping", None)
    return (lambda h: torch.tanh(proj(h) / cap) * cap) if cap else proj


@contextlib.contextmanager
def final_hidden(model):
    """Yields a dict whose ``"h"`` holds the base model's last hidden state ([B, T, d], final norm applied:
    what the LM head reads) after a forward."""
    from sparserm.model.backbone import base_model

    seen: dict = {}

    def hook(_module, _inputs, output):
        seen["h"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = base_model(unwrap_causal_lm(model)).register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


_FULL_LOGITS: "weakref.WeakSet" = weakref.WeakSet()  # models whose head output_head does not reproduce


def use_full_logits(model) -> None:
    """``model``'s log-probs from its full logits from now on: under ZeRO-3, whose head weight is gathered only
    inside the model's own forward (the chunked head's recompute in backward would find it released)."""
    _FULL_LOGITS.add(unwrap_causal_lm(model))


def forward_batch(model, batch: SequenceBatch, needs: frozenset[str] = frozenset(), sae=None,
                  layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor, TokenDists | None, torch.Tensor | None]:
    """Summed response log-probs [R], token counts [R], optional TokenDists and pooled features [R, d_sae].

    Without ``"token"``, the model returns logits for its last position only and the response log-probs are
    computed from the final hidden states of the real response tokens, a chunk at a time
    (``chunked_token_logprobs``): the [R, T, V] logits, a few hundred MB at a 49k vocabulary, never exist. The
    one position of logits the model does return checks that path's head against the model's own; a model
    whose head differs (a logit scale, say) falls back, with a warning, to full logits."""
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"forward_batch: unknown needs {sorted(unknown)} (known: {list(NEEDS)})")
    if "features" in needs and (sae is None or layer is None):
        raise ValueError("forward_batch: 'features' needs an SAE and its layer")
    keep = batch.n_response + 1
    full = "token" in needs or unwrap_causal_lm(model) in _FULL_LOGITS
    targets = batch.input_ids[:, -batch.n_response:]
    mask = batch.response_mask[:, -batch.n_response:]
    with contextlib.ExitStack() as stack:
        seen = stack.enter_context(residual_after(model, layer)) if "features" in needs else {}
        last = stack.enter_context(final_hidden(model)) if not full else {}
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, use_cache=False, logits_to_keep=keep if full else 1)
    tokens = None
    if full:
        logp = torch.log_softmax(out.logits[:, -keep:-1].float(), dim=-1)  # [R, T, V], predicts the last T tokens
        lp = (logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask).sum(1)
        tokens = TokenDists(logp, mask.to(logp.dtype)) if "token" in needs else None
    else:
        head, h = output_head(model), last["h"]
        with torch.no_grad():  # the model's own last-position logits against this head's, to rounding
            mine, theirs = head(h[:, -1]).float(), out.logits[:, -1].float()
            tol = max(1e-3, 4 * torch.finfo(out.logits.dtype).eps) * float(theirs.abs().max())
            ok = float((mine - theirs).abs().max()) <= tol
        if not ok:
            warnings.warn(f"{type(unwrap_causal_lm(model)).__name__}: its logits are not its output embeddings' "
                          "(a logit scale or cap this path does not know); computing full logits instead")
            _FULL_LOGITS.add(unwrap_causal_lm(model))
            return forward_batch(model, batch, needs, sae, layer)
        rows, cols = mask.nonzero(as_tuple=True)
        pos = cols + (h.shape[1] - keep)  # the position before each response token
        tok_lp = chunked_token_logprobs(head, h[rows, pos], targets[rows, cols], out.logits.shape[-1])
        lp = torch.zeros(h.shape[0], dtype=tok_lp.dtype, device=tok_lp.device).index_add(0, rows, tok_lp)
    counts = mask.sum(1).to(lp.dtype)
    feats = pooled_features(seen["h"], batch.response_mask, sae) if "features" in needs else None
    return lp, counts, tokens, feats


def tokenize_pairs(tok, pairs: list[dict], max_tokens: int, chat_template: bool) -> list[tuple]:
    """Per pair: ((prompt ids, chosen ids + eos), (prompt ids, rejected ids + eos)), both within ``max_tokens``
    (the prompt cut as ``encode_group`` cuts it): the ids the trainer and the reference cache both use."""
    from sparserm.align.logprobs import groups_to_sequences
    from sparserm.model.text import encode_group

    out = []
    for p in pairs:
        group = encode_group(tok, p["prompt"], [p["chosen"], p["rejected"]], max_tokens - 1, chat_template)
        w, l = groups_to_sequences([group], tok.eos_token_id)
        out.append((w, l))
    return out


def pair_forward(model, seqs: list[tuple], idx: list[int], pad_id: int, device, needs: frozenset[str] = frozenset(),
                 sae=None, layer: int | None = None) -> PairForward:
    """The pairs ``idx`` of ``seqs`` (per pair: (prompt ids, chosen ids), (prompt ids, rejected ids)), chosen
    and rejected in one forward."""
    batch = encode_batch([seqs[i][0] for i in idx] + [seqs[i][1] for i in idx], pad_id).to(device)
    lp, count, tokens, feats = forward_batch(model, batch, needs, sae, layer)
    b = len(idx)
    return PairForward(PairStats(lp[:b], lp[b:], count[:b], count[b:]), tokens,
                       feats[:b] if feats is not None else None, feats[b:] if feats is not None else None)
