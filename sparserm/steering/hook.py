"""The decoding hook of DSPA-style steering, for transformers generation: two forward hooks on one model.

- The gate, on the input block: on the first forward of a generation (the prompt, left-padded), per row, the input
  SAE encodes the residual at that row's real tokens (``attention_mask``), ``g(x)`` is their activation density
  and the row's :class:`SteeringVector` is computed from it (``vector.steering_vector``), once. A row given a vector
  up front (e.g. the same latents for every prompt) or not steered is not gated.
- The edit, on the output block, at every forward: the residual ``h`` at each position that emits a response
  token (in the prompt forward only the last prompt token, which emits the first response token; in every later
  forward each position it holds: in decoding the one token fed back, which emits the next one; when a response is
  scored rather than generated, ``steering.likelihood``, every response token after the prompt, each of which
  predicts the next) of each steered row is encoded, ``a = encode(h)``, edited (``edit.edit_latents``: only
  selected latents already active, by the row's mode) to ``a'``, and ``h + decode(a') - decode(a)`` replaces it,
  so the SAE's reconstruction error stays in the residual. A position whose latents did not change is left bit
  for bit as it was. A later forward may hold each request's row repeated (``rep`` consecutive rows per request,
  as a KV cache's ``batch_repeat_interleave`` lays out several responses scored after one prompt); every copy
  gets its request's vector.

Left padding keeps every row's last position real, and each row carries its own vector, alpha and mode, so a
request is steered the same alone or in a batch. Per row and forward the hook records which latents changed;
:meth:`SteerRun.counts` sums them over the forwards that emitted the row's own tokens (up to its EOS).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from sparserm.steering.conditional_map import ConditionalMap, activation_density
from sparserm.steering.vector import SteerSettings, SteeringVector, steering_vector


@dataclass
class SteerRun:
    """The state of one steered generation: per-row vectors and what each forward changed."""

    attention_mask: torch.Tensor  # [B, T] of the prompt batch (left-padded)
    settings: list[SteerSettings | None]  # None or enabled=False: the row is not steered
    vectors: list[SteeringVector | None]
    trace: list[dict] | None = None  # per forward: rows, h, a, a', h' (tests)
    # per forward: row -> (positions edited, latents changed at them, one entry per position and latent)
    steps: list[dict[int, tuple[int, torch.Tensor]]] = field(default_factory=list)
    packed: tuple | None = None  # (rows, latents [R, k], scores [R, k], alpha [R], modes) of the steered rows
    prompt_done: bool = False  # the prompt forward has run (later forwards edit every position they hold)

    def needs_gate(self) -> list[int]:
        return [b for b, (s, v) in enumerate(zip(self.settings, self.vectors))
                if v is None and s is not None and s.enabled]

    def pack(self, device) -> None:
        self.packed = pack_vectors(self.vectors, device)

    def counts(self, n_steps: list[int]) -> list[dict]:
        """Per row, over its first ``n_steps[b]`` forwards: :func:`edit_counts`."""
        return [edit_counts([step[b] for step in self.steps[:n] if b in step]) for b, n in enumerate(n_steps)]


def pack_vectors(vectors: list[SteeringVector | None], device) -> tuple:
    """The vectors with latents, one row each: (their indices into ``vectors``, latents [R, k] with -1 in unused
    slots, scores [R, k], alpha [R], modes)."""
    rows = [b for b, v in enumerate(vectors) if v is not None and len(v.latents)]
    k = max((len(vectors[b].latents) for b in rows), default=0)
    latents = torch.full((len(rows), k), -1, dtype=torch.long)
    scores = torch.zeros(len(rows), k)
    for j, b in enumerate(rows):
        latents[j, : len(vectors[b].latents)], scores[j, : len(vectors[b].latents)] = vectors[b].latents, vectors[b].scores
    alpha = torch.tensor([float(vectors[b].alpha) for b in rows])
    return rows, latents.to(device), scores.to(device), alpha.to(device), [vectors[b].mode for b in rows]


def edit_counts(changed: list[tuple[int, torch.Tensor]]) -> dict:
    """One row's forwards' entries (positions edited, the latents changed at them) summed: token positions
    edited, distinct latents edited (and their ids, so that several rows' sets can be joined), and latent edits
    in all."""
    changed = [c for c in changed if c[0]]
    ids = torch.cat([c[1] for c in changed]) if changed else torch.empty(0, dtype=torch.long)
    distinct = ids.unique().tolist()
    return {"edited_tokens": sum(c[0] for c in changed), "edited_latents": len(distinct),
            "edited_latent_ids": distinct, "latent_edits": int(ids.numel())}


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output, h):
    return (h, *output[1:]) if isinstance(output, tuple) else h


class SteeringHook:
    """The gate and the edit for one model, its map and its two SAEs (loaded on the model's device)."""

    def __init__(self, model, cmap: ConditionalMap, input_sae, output_sae, input_layer: int, output_layer: int):
        if input_layer > output_layer:
            raise ValueError(f"input layer {input_layer} is after output layer {output_layer}: the gate must come first")
        self.model, self.cmap = model, cmap
        self.input_sae, self.output_sae = input_sae, output_sae
        self.input_layer, self.output_layer = input_layer, output_layer

    def prompt_density(self, h: torch.Tensor) -> torch.Tensor:
        """g(x) [m_in] from the residual after the input block at a prompt's own tokens [T, d]."""
        return activation_density(self.input_sae.encode(h))

    @contextlib.contextmanager
    def run(self, attention_mask: torch.Tensor, settings: list[SteerSettings | None],
            vectors: list[SteeringVector | None] | None = None, trace: bool = False):
        """Hooks installed for one ``generate`` call over a batch with this prompt ``attention_mask``; yields the
        :class:`SteerRun`. ``vectors[b]`` given: row b uses it instead of its prompt's."""
        from sparserm.align.pair_forward import block

        run = SteerRun(attention_mask, list(settings), list(vectors or [None] * len(settings)),
                       [] if trace else None)
        if len(run.vectors) != len(run.settings) or len(run.settings) != attention_mask.shape[0]:
            raise ValueError("SteeringHook.run: one setting (and vector) per row of the batch")
        handles = []
        if run.needs_gate():
            handles.append(block(self.model, self.input_layer).register_forward_hook(self._gate(run)))
        else:
            run.pack(attention_mask.device)
        handles.append(block(self.model, self.output_layer).register_forward_hook(self._edit(run)))
        try:
            yield run
        finally:
            for handle in handles:
                handle.remove()

    def _gate(self, run: SteerRun):
        def hook(_module, _inputs, output):
            if run.packed is not None:
                return None
            h = _hidden(output)
            if h.shape[:2] != run.attention_mask.shape:
                raise RuntimeError(f"steering gate: the first forward has shape {tuple(h.shape[:2])}, the prompt "
                                   f"batch {tuple(run.attention_mask.shape)}")
            for b in run.needs_gate():
                g = self.prompt_density(h[b][run.attention_mask[b].bool()])
                run.vectors[b] = steering_vector(g, self.cmap, run.settings[b])
            run.pack(h.device)
            return None

        return hook

    def _edit(self, run: SteerRun):
        from sparserm.steering.flat_edit import edit_flat  # it imports this module

        def hook(_module, _inputs, output):
            rows, latents, scores, alpha, modes = run.packed
            first, run.prompt_done = not run.prompt_done, True
            if not rows:
                run.steps.append({})
                return None
            h = _hidden(output)
            B = run.attention_mask.shape[0]
            if h.shape[0] % B:
                raise RuntimeError(f"steering edit: a forward of {h.shape[0]} rows for a batch of {B}")
            rep = h.shape[0] // B  # > 1: the batch repeated row by row (a cache's batch_repeat_interleave)
            n_pos = 1 if first else h.shape[1]
            if rep == 1 and n_pos == 1:  # decoding: one position per row
                idx, each = torch.as_tensor(rows, device=h.device), 1
            else:
                idx = torch.as_tensor([b * rep + r for b in rows for r in range(rep)], device=h.device)
                each = rep * n_pos
            x = h[idx, -n_pos:].reshape(-1, h.shape[-1])
            row_of_token = torch.arange(len(rows), device=h.device).repeat_interleave(each)
            e = edit_flat(x, row_of_token, torch.ones_like(row_of_token, dtype=torch.bool),
                          (latents, scores, alpha, modes), self.output_sae)
            at = (e.a_edited != e.a).cpu().view(len(rows), each, -1)  # one device-to-host copy per forward
            run.steps.append({b: (int(at[j].any(-1).sum()), at[j].nonzero()[:, 1]) for j, b in enumerate(rows)})
            if run.trace is not None:
                owner = [b for b in rows for _ in range(each)]  # the request of each edited (row, position)
                run.trace.append({"rows": owner, "h": x.detach().clone(), "a": e.a, "a_edited": e.a_edited,
                                  "h_edited": e.new.detach().clone()})
            if not bool(e.moved.any()):
                return None
            out = h.clone()
            out[idx, -n_pos:] = e.new.reshape(len(idx), n_pos, -1)
            return _with_hidden(output, out)

        return hook
