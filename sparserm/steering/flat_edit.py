"""DSPA-style steering on one flattened token batch, as vLLM runs a step: pure torch, no vLLM.

vLLM runs the tokens of every request scheduled in a step as one batch ``h`` [N, d]: request ``i`` (in the batch's
order) holds tokens ``query_start_loc[i]:query_start_loc[i+1]``, each at its absolute position (``positions[t]``,
the decoder layer's first argument); tokens after the last request's are padding. A prompt may be split over
several steps (chunked prefill); a step may hold prompt chunks of some requests and decode tokens of others.

This module applies :mod:`sparserm.steering.hook`'s gate and edit to such a batch, so that a request is steered
exactly as the transformers hook steers it alone:

- :func:`token_layout`: per token, its request, whether it is a prompt token (position < prompt_len) and whether
  it emits a response token (position >= prompt_len - 1: the last prompt token, which emits the first response
  token, and every later token, each fed back to emit the next; the other prompt tokens never do);
- the gate: :func:`gate_slots` picks each gated request's prompt tokens not yet seen, :func:`prompt_counts` counts
  per input latent on how many of them it is active, and :class:`PromptDensity` sums those over the prompt's
  chunks; once the prompt's last token was seen, ``density()`` is ``activation_density`` over the whole prompt
  (the share of its tokens on which each latent is active: a count over tokens divided by their number, so
  summing counts over chunks gives it exactly) and ``vector.steering_vector`` turns it into the request's vector;
- the edit: :func:`edit_flat` encodes the emitting tokens of steered requests with the output SAE, edits them with
  ``edit.edit_latents`` by their request's vector (packed by :func:`pack_vectors`, as ``hook.SteerRun.pack``
  packs rows), and gives ``h + decode(a') - decode(a)`` at tokens whose latents changed, ``h`` bit for bit
  elsewhere; :func:`row_changes` and :func:`request_counts` give what it changed in ``hook.SteerRun``'s terms.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparserm.steering import hook
from sparserm.steering.edit import edit_latents
from sparserm.steering.vector import SteeringVector

Packed = tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]  # latents [R, k], scores [R, k], alpha [R], modes


@dataclass
class TokenLayout:
    """What each of the N tokens of one forward is (CPU tensors)."""

    request: torch.Tensor  # int64 [N]: the batch index of the token's request, -1 for padding
    positions: torch.Tensor  # int64 [N]: its absolute position in its request's sequence
    prompt: torch.Tensor  # bool [N]: a prompt token (position < prompt_len)
    emits: torch.Tensor  # bool [N]: it emits a response token (position >= prompt_len - 1)


def token_layout(query_start_loc, positions: torch.Tensor, prompt_lens) -> TokenLayout:
    """The layout of a forward over ``len(positions)`` tokens whose requests hold ``query_start_loc`` [R + 1] spans
    (from 0) and have prompts of ``prompt_lens`` [R] tokens."""
    qsl = torch.as_tensor(query_start_loc, dtype=torch.long).cpu()
    pos = positions.reshape(-1).long().cpu()
    if int(qsl[0]) != 0 or int(qsl[-1]) > len(pos):
        raise ValueError(f"token_layout: spans {qsl.tolist()} do not fit a batch of {len(pos)} tokens")
    request = torch.full((len(pos),), -1, dtype=torch.long)
    request[: int(qsl[-1])] = torch.repeat_interleave(torch.arange(len(qsl) - 1), qsl.diff())
    plen = torch.cat([torch.as_tensor(prompt_lens, dtype=torch.long).reshape(-1), torch.zeros(1, dtype=torch.long)])
    own = plen[request]  # padding reads the appended 0 (index -1)
    real = request >= 0
    return TokenLayout(request, pos, real & (pos < own), real & (pos >= own - 1))


def token_rows(request: torch.Tensor, row_of_request: torch.Tensor) -> torch.Tensor:
    """Per token, the row of its request in a per-forward table (``row_of_request`` [R], -1: not in it); -1 for
    padding."""
    table = torch.cat([torch.as_tensor(row_of_request, dtype=torch.long).reshape(-1), torch.full((1,), -1)])
    return table[request]


def gate_slots(layout: TokenLayout, slot_of_request: torch.Tensor, seen_of_request: torch.Tensor) -> torch.Tensor:
    """Per token, the gate slot of its request (``slot_of_request`` [R], -1: not gated) where it is a prompt token at
    or after the ``seen_of_request`` [R] tokens already counted (a recomputed chunk is not counted twice); else -1."""
    slot = token_rows(layout.request, slot_of_request)
    seen = torch.cat([torch.as_tensor(seen_of_request, dtype=torch.long).reshape(-1), torch.zeros(1, dtype=torch.long)])
    fresh = layout.positions >= seen[layout.request]
    return torch.where(layout.prompt & fresh, slot, torch.full_like(slot, -1))


@torch.no_grad()
def prompt_counts(h: torch.Tensor, slot_of_token: torch.Tensor, n_slots: int, input_sae
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per gate slot: on how many of its tokens of ``h`` [N, d] (``slot_of_token`` [N], -1: none) each input latent
    is active (float32 [S, m_in], whole numbers) and how many tokens it has (int64 [S])."""
    take = (slot_of_token >= 0).nonzero().squeeze(-1)
    slots = slot_of_token[take]
    active = (input_sae.encode(h[take.to(h.device)]) > 0).float()
    counts = torch.zeros(n_slots, active.shape[-1], device=active.device)
    counts.index_add_(0, slots.to(active.device), active)
    return counts, torch.bincount(slots, minlength=n_slots)


@dataclass
class PromptDensity:
    """One prompt's gate so far: per input latent, on how many of its tokens seen it was active, and ``n``, the
    tokens seen (its positions 0..n-1: chunks come in order)."""

    active: torch.Tensor  # float32 [m_in]
    n: int = 0

    def add(self, active: torch.Tensor, n: int) -> None:
        self.active = self.active.to(active.device) + active
        self.n += int(n)

    def density(self) -> torch.Tensor:
        """g(x) [m_in] over the tokens seen: ``activation_density``'s value over them all at once."""
        if self.n == 0:
            raise ValueError("PromptDensity: a prompt with no tokens seen has no activation density")
        return self.active / torch.full((1,), float(self.n), device=self.active.device)


def pack_vectors(vectors: list[SteeringVector], device) -> tuple[list[int], Packed]:
    """The vectors with latents, packed one row each as ``hook.SteerRun.pack`` packs them: (their indices into
    ``vectors``, (latents [R, k] with -1 in unused slots, scores [R, k], alpha [R], modes))."""
    rows, latents, scores, alpha, modes = hook.pack_vectors(list(vectors), device)
    return rows, (latents, scores, alpha, modes)


@dataclass
class FlatEdit:
    """The edit of one forward: the M tokens encoded (steered rows' emitting tokens) and what it made of them."""

    tokens: torch.Tensor  # int64 [M] (CPU): indices into h
    rows: torch.Tensor  # int64 [M] (CPU): their rows of the packed steering
    a: torch.Tensor  # [M, m_out] output-SAE activations at them
    a_edited: torch.Tensor  # [M, m_out] after edit_latents
    moved: torch.Tensor  # bool [M]: some latent changed
    new: torch.Tensor  # [M, d] (h's dtype): h + decode(a') - decode(a) where moved, h bit for bit elsewhere

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` with the edited tokens replaced (a copy; ``h`` itself when nothing moved)."""
        if not bool(self.moved.any()):
            return h
        out = h.clone()
        out[self.tokens.to(h.device)] = self.new
        return out


@torch.no_grad()
def edit_flat(h: torch.Tensor, row_of_token: torch.Tensor, emits: torch.Tensor, packed: Packed, output_sae
              ) -> FlatEdit:
    """The edit of ``h`` [N, d] (the residual after the output block) at each token that emits a response token
    (``emits`` [N]) and belongs to a steered row (``row_of_token`` [N], -1: not steered), by its row of ``packed``:
    ``hook.SteeringHook``'s edit, applied to every row at once."""
    latents, scores, alpha, modes = packed
    tokens = ((row_of_token >= 0) & emits.bool()).nonzero().squeeze(-1).cpu()
    rows = row_of_token[tokens].cpu()
    x = h[tokens.to(h.device)]
    a = output_sae.encode(x)
    on = rows.to(latents.device)
    a2 = edit_latents(a, latents[on], scores[on], alpha[on], [modes[r] for r in rows.tolist()])
    moved = (a2 != a).any(-1)
    new = x.clone()
    if bool(moved.any()):
        delta = output_sae.decode(a2[moved]) - output_sae.decode(a[moved])
        new[moved] = x[moved] + delta.to(x.dtype)
    return FlatEdit(tokens, rows, a, a2, moved, new)


def row_changes(edit: FlatEdit, n_rows: int, counted: torch.Tensor | None = None
                ) -> dict[int, tuple[int, torch.Tensor]]:
    """Per row, ``hook.SteerRun.steps``' entry of this forward over its ``counted`` tokens (default all): (tokens
    edited, the latents changed at them, one entry per token and latent)."""
    pairs = (edit.a_edited != edit.a).nonzero().cpu()  # [E, 2]: (token i of the M, latent)
    keep = torch.ones(len(edit.rows), dtype=torch.bool) if counted is None else counted.cpu().bool()
    moved = edit.moved.cpu() & keep
    out = {}
    for r in range(n_rows):
        mine = (edit.rows == r) & keep
        out[r] = (int((moved & mine).sum()), pairs[mine[pairs[:, 0]], 1])
    return out


def request_counts(steps: list[tuple[int, torch.Tensor]]) -> dict:
    """``hook.SteerRun.counts`` of one request over its forwards' entries: edited_tokens, edited_latents,
    latent_edits."""
    return hook.edit_counts(steps)
