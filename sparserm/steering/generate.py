"""Steered decoding through transformers generation: a map folder, the full causal LM, both SAEs, one batch a call.

``SteeredGenerator.load(map_dir)`` loads what the map was built with (its manifest's ``model`` section; both SAE
folders, checked against the map's key). ``generate`` takes chat conversations, one :class:`SteerSettings` per
request (None, or ``enabled=False``: that request is not steered; default: the map's ``steer`` settings for
every request) and the sampling settings of ``align.generate`` (``Sampling``); prompts are rendered and cut as the
transformers policy renders them (``align.engines.base.render_prompts``) and left-padded into one batch, and
``model.generate`` runs under the :class:`SteeringHook`. Each output reports its steering: the vector (gate, latents
selected, their scores) and how many of its token positions and latents were edited. The hook sits on the one
model for the length of a call, so one generator runs one ``generate`` at a time (a Serve replica's batch).

Streaming: ``on_token(row, token_id)`` is called, in the generating thread, with each of a row's own tokens as
soon as it is sampled (never its EOS, nothing after its end); returning True ends that row after this token (a stop
string, a per-request token budget, a caller gone), while the other rows go on. One call streams every row of the
batch, so streamed requests share batches with the others (the serving app, ``sparserm.serve.steer_app``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from sparserm.align.engines.base import Sampling, left_pad, render_prompts
from sparserm.steering.hook import SteeringHook
from sparserm.steering.store import SteeringMap, load_map
from sparserm.steering.vector import SteerSettings, SteeringVector


@dataclass
class SteeredOutput:
    text: str
    token_ids: list[int]  # generated, up to (not including) EOS
    n_tokens: int
    finished: bool  # ended with EOS within max_new_tokens
    steering: dict | None  # None when not steered; else the vector and edited_tokens / edited_latents / latent_edits
    stopped: bool = False  # ended by ``on_token`` returning True (after its last token)


TokenCallback = Callable[[int, int], bool]  # (row, token id) -> True: the row ends after this token


class RowEnds(StoppingCriteria):
    """A per-row stopping criterion for ``model.generate``: records where each row's own tokens end (its first EOS,
    or the token after which ``on_token`` returned True) and ends such a row while the others go on."""

    def __init__(self, n_rows: int, eos_ids: set[int], on_token: TokenCallback | None = None):
        self.eos_ids, self.on_token = eos_ids, on_token
        self.n_own: list[int] = [0] * n_rows  # own tokens so far (EOS excluded)
        self.how: list[str | None] = [None] * n_rows  # None: running (or cut by max_new_tokens), "eos", "stop"

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        for b, t in enumerate(input_ids[:, -1].tolist()):
            if self.how[b] is not None:
                continue
            if t in self.eos_ids:
                self.how[b] = "eos"
                continue
            self.n_own[b] += 1
            if self.on_token is not None and self.on_token(b, t):
                self.how[b] = "stop"
        return torch.tensor([h is not None for h in self.how], dtype=torch.bool, device=input_ids.device)


class SteeredGenerator:
    def __init__(self, smap: SteeringMap, model, tokenizer, input_sae, output_sae):
        self.map, self.model, self.tokenizer = smap, model, tokenizer
        self.hook = SteeringHook(model, smap.cmap, input_sae, output_sae, smap.input.layer, smap.output.layer)

    @classmethod
    def load(cls, map_dir: str | Path, cache_dir: str | None = None, device: str | None = None) -> "SteeredGenerator":
        from sparserm.model.backbone import load_causal_lm, resolve_device
        from sparserm.sae.autoencoder import SparseAutoencoder

        smap = load_map(map_dir)
        cfg = smap.cfg
        model, tok = load_causal_lm(cfg.model, cache_dir or cfg.run.cache_dir, resolve_device(device or cfg.model.device))
        dev = next(model.parameters()).device
        saes = [SparseAutoencoder.load(side.folder, dev) for side in (smap.input, smap.output)]
        return cls(smap, model, tok, *saes)

    def settings(self, **changes) -> SteerSettings:
        """The map's ``steer`` settings with ``changes`` (a request's own alpha, mode, k_prompt, k_diff)."""
        return SteerSettings.of(self.map.cfg.steer, **changes).check()

    def sampling(self, **changes) -> Sampling:
        """``align.generate``'s sampling settings of the map's config, with ``changes``."""
        return replace(Sampling.of(self.map.cfg.align.generate), **changes)

    @torch.no_grad()
    def generate(self, conversations: list[list[dict]], steering: list[SteerSettings | None] | None = None,
                 sampling: Sampling | None = None, seed: int = 0, vectors: list[SteeringVector | None] | None = None,
                 trace: bool = False, on_token: TokenCallback | None = None
                 ) -> list[SteeredOutput] | tuple[list[SteeredOutput], list[dict]]:
        """One response per conversation, in one batch (``trace``: also the hook's per-forward record;
        ``on_token``: see the module docstring)."""
        if not conversations:
            return ([], []) if trace else []
        s = sampling or self.sampling()
        steering = [self.settings()] * len(conversations) if steering is None else list(steering)
        for st in steering:
            if st is not None:
                st.check()
        tok = self.tokenizer
        prompts = render_prompts(tok, conversations, s.max_prompt_tokens, self.map.cfg.model.chat_template)
        ids, mask = left_pad(prompts, tok.pad_token_id)
        device = next(self.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        sample = s.temperature > 0
        ends = RowEnds(len(conversations), _eos_ids(tok, self.model), on_token)
        torch.manual_seed(seed)
        with self.hook.run(mask, steering, vectors, trace) as run:
            gen = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=sample,
                                      temperature=s.temperature if sample else None, top_p=s.top_p if sample else None,
                                      max_new_tokens=s.max_new_tokens, pad_token_id=tok.pad_token_id,
                                      stopping_criteria=StoppingCriteriaList([ends]))
        new = gen[:, ids.shape[1]:].tolist()
        # a row's own tokens come from its first forwards: up to and including the one that emitted its EOS
        n_steps = [n + (how == "eos") for n, how in zip(ends.n_own, ends.how)]
        counts = run.counts(n_steps)
        out = []
        for b, row in enumerate(new):
            own = [t for t in row[: ends.n_own[b]] if t != tok.pad_token_id]
            vector = run.vectors[b]
            info = None if vector is None else {"enabled": True, **vector.describe(), **counts[b]}
            out.append(SteeredOutput(tok.decode(own, skip_special_tokens=True).strip(), own, len(own),
                                     ends.how[b] == "eos", info, ends.how[b] == "stop"))
        return (out, run.trace) if trace else out


def _eos_ids(tokenizer, model) -> set[int]:
    """The tokenizer's EOS and any the model's generation config ends a sequence with."""
    ids = {tokenizer.eos_token_id}
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return {i for i in ids if i is not None}
