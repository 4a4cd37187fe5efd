"""Preference objectives by name (``align.loss.name``): what each needs from the reference and the policy
forward, and its loss.

An objective is an :class:`Objective` registered in ``OBJECTIVES`` (``@register``). It declares ``reference``,
what the trainer computes with the reference model for every pair (an entry of ``REFERENCE_KINDS``):

- ``"none"``: nothing; the trainer runs no reference pass and stores no reference (SimPO);
- ``"sequence"``: the summed response log-probs and response token counts of chosen and rejected, a
  :class:`PairStats` (length-normalised log-prob = sum / count) (DPO);
- ``"token"``: those stats and the per-token log-distributions over the vocabulary at the response positions,
  a ``TokenDists`` (TDPO-2's sequential KL);
- ``"features"``: those stats and the pooled SAE activations of chosen and rejected, [B, d_sae] dense (FPO;
  the trainer reads them from the offline reference cache).

and ``policy_needs``, what the policy forward computes beyond the PairStats it always gives (entries of
``POLICY_NEEDS`` = ``sparserm.align.pair_forward.NEEDS``: ``"token"``, ``"features"``; empty by default).

``loss(policy, reference, cfg)`` gets the policy's ``PairForward`` of a micro-batch (with gradients), the
reference's for the same pairs (None for ``"none"``; only ``stats`` for ``"sequence"``) and ``align.loss``; it
returns the per-pair loss [B] and u [B], the detached margin whose sign is the pair's reward accuracy (logged;
``reward_margin`` = mean u / beta).

Settings: ``align.loss.beta`` unset (None) means the objective's own ``beta`` (DPO, TDPO-2, FPO 0.1; SimPO 2.0,
each paper's default). Fields it reads beyond beta are named in ``settings``; ``key`` (the run's fingerprint of
the loss) holds the name, the beta in use and those fields only, so a SimPO setting never changes a DPO key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # pair_forward imports PairStats from here
    from sparserm.align.pair_forward import PairForward, TokenDists

REFERENCE_KINDS = ("none", "sequence", "token", "features")  # what the trainer computes with the reference
POLICY_NEEDS = ("token", "features")  # = sparserm.align.pair_forward.NEEDS (not imported: it imports this module)


@dataclass
class PairStats:
    """Per pair, [B] each: summed response log-probs and response token counts of chosen and rejected."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def normalised(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Length-normalised log-probs a(y_w), a(y_l): the mean log-prob of a response token."""
        return self.chosen / self.chosen_tokens, self.rejected / self.rejected_tokens

    def select(self, idx: list[int]) -> "PairStats":
        return PairStats(*(t[idx] for t in self.as_tuple()))

    def to(self, device, dtype) -> "PairStats":
        return PairStats(*(t.to(device, dtype) for t in self.as_tuple()))

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return self.chosen, self.rejected, self.chosen_tokens, self.rejected_tokens

    def as_dict(self) -> dict[str, torch.Tensor]:
        """For ``safetensors`` (contiguous tensors by field name)."""
        return {k: t.contiguous() for k, t in zip(("chosen", "rejected", "chosen_tokens", "rejected_tokens"),
                                                  self.as_tuple())}

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> "PairStats":
        return cls(d["chosen"], d["rejected"], d["chosen_tokens"], d["rejected_tokens"])


class Objective:
    """One preference objective. Subclasses set ``name``, ``reference``, ``policy_needs``, ``beta`` (default
    when ``align.loss.beta`` is unset) and ``settings``, and implement ``loss``."""

    name: str = ""
    reference: str = "sequence"  # an entry of REFERENCE_KINDS
    policy_needs: frozenset[str] = frozenset()  # entries of POLICY_NEEDS the policy forward computes
    beta: float = 0.1
    settings: tuple[str, ...] = ()  # further align.loss fields the loss reads (they enter ``key``)

    def beta_of(self, cfg) -> float:
        return self.beta if cfg.beta is None else float(cfg.beta)

    def key(self, cfg) -> dict:
        """What of ``align.loss`` changes this objective's result (a dict setting as a sorted [[k, v], ...])."""
        def stable(v):
            return sorted([k, w] for k, w in v.items()) if isinstance(v, dict) else v

        return {"name": self.name, "beta": self.beta_of(cfg), **{k: stable(getattr(cfg, k)) for k in self.settings}}

    def loss(self, policy: PairForward, reference: PairForward | None, cfg) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


OBJECTIVES: dict[str, Objective] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: ``OBJECTIVES[cls.name] = cls()``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}: an objective needs a name")
    if cls.reference not in REFERENCE_KINDS:
        raise ValueError(f"objective {cls.name!r}: reference={cls.reference!r} is not computed by the trainer "
                         f"(expected one of {list(REFERENCE_KINDS)})")
    if not set(cls.policy_needs) <= set(POLICY_NEEDS):
        raise ValueError(f"objective {cls.name!r}: policy_needs={sorted(cls.policy_needs)} is not computed by the "
                         f"policy forward (expected entries of {list(POLICY_NEEDS)})")
    OBJECTIVES[cls.name] = cls()
    return cls


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"align.loss.name={name!r} is unknown: expected one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def _given(x, objective: str, what: str):
    if x is None:
        raise ValueError(f"objective {objective!r} needs {what}, which the forward did not compute")
    return x


@register
class DPO(Objective):
    """u = beta[(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))] (summed log-probs);
    loss = -log sigma(u) (Rafailov et al. 2023)."""

    name, reference, beta = "dpo", "sequence", 0.1

    def loss(self, policy, reference, cfg):
        p, r = policy.stats, reference.stats
        u = self.beta_of(cfg) * ((p.chosen - r.chosen) - (p.rejected - r.rejected))
        return -F.logsigmoid(u), u.detach()


@register
class SimPO(Objective):
    """u = beta (a_pi(y_w) - a_pi(y_l)) - gamma, a = length-normalised log-prob; loss = -log sigma(u); no
    reference model (Meng et al. 2024; beta 2.0 and gamma 0.5 = ``align.loss.simpo_gamma`` by default)."""

    name, reference, beta, settings = "simpo", "none", 2.0, ("simpo_gamma",)

    def loss(self, policy, reference, cfg):
        a_w, a_l = policy.stats.normalised()
        u = self.beta_of(cfg) * (a_w - a_l) - cfg.simpo_gamma
        return -F.logsigmoid(u), u.detach()


def sequential_kl(policy: TokenDists, reference: TokenDists) -> torch.Tensor:
    """Per row [R]: sum over its real response tokens of KL(ref(.|prefix) || pi(.|prefix))
    = sum_v p_ref(v) (log p_ref(v) - log p_pi(v)); positions off the (policy's) mask give 0."""
    ref = reference.logp.to(policy.logp.dtype)
    kl = (ref.exp() * (ref - policy.logp)).sum(-1)  # [R, T]
    return torch.where(policy.mask.bool(), kl, torch.zeros_like(kl)).sum(-1)


@register
class TDPO2(Objective):
    """u = beta[(lp_pi(y_w) - lp_ref(y_w)) - (lp_pi(y_l) - lp_ref(y_l))] - alpha beta [KL(y_l) - sg(KL(y_w))],
    lp summed log-probs, KL the sequential KL of ``sequential_kl``; loss = -log sigma(u) (Zeng et al. 2024,
    TDPO-2, as its public code: logits = margin - alpha (rejected_kl - chosen_kl.detach()), scaled by beta)."""

    name, reference, policy_needs, beta, settings = "tdpo2", "token", frozenset({"token"}), 0.1, ("alpha",)

    def loss(self, policy, reference, cfg):
        p, r = policy.stats, reference.stats
        pi_w, pi_l = _given(policy.tokens, self.name, "the policy's token distributions").halves()
        ref_w, ref_l = _given(reference.tokens, self.name, "the reference's token distributions").halves()
        kl_w, kl_l = sequential_kl(pi_w, ref_w), sequential_kl(pi_l, ref_l)
        beta = self.beta_of(cfg)
        u = beta * ((p.chosen - r.chosen) - (p.rejected - r.rejected)) - cfg.alpha * beta * (kl_l - kl_w.detach())
        return -F.logsigmoid(u), u.detach()


def feature_mse(c_pi: torch.Tensor, c_ref: torch.Tensor, cfg) -> torch.Tensor:
    """D(y) per row [B] of pooled activations [B, d_sae]: (1/|I|) sum_{i in I} w_i (c_pi,i - c_ref,i)^2, I =
    topk(c_pi) | topk(c_ref) (``fpo_index_set`` "union") or topk(c_pi) ("policy"), chosen on detached values,
    k = min(fpo_k, d_sae); latents of ``fpo_latent_weights`` are always in I with their weight, others weigh 1."""
    c_ref = c_ref.to(c_pi.device, c_pi.dtype)
    d = c_pi.shape[-1]
    k = min(int(cfg.fpo_k), d)
    member = torch.zeros(c_pi.shape, dtype=torch.bool, device=c_pi.device)
    member.scatter_(1, c_pi.detach().topk(k, dim=1).indices, True)
    if cfg.fpo_index_set == "union":
        member.scatter_(1, c_ref.detach().topk(k, dim=1).indices, True)
    elif cfg.fpo_index_set != "policy":
        raise ValueError(f"align.loss.fpo_index_set={cfg.fpo_index_set!r}: expected union|policy")
    weight = torch.ones(d, dtype=c_pi.dtype, device=c_pi.device)
    if cfg.fpo_latent_weights:
        ids = [int(i) for i in cfg.fpo_latent_weights]
        bad = [i for i in ids if not 0 <= i < d]
        if bad:
            raise ValueError(f"align.loss.fpo_latent_weights: latent id(s) {bad} out of range for the SAE's "
                             f"d_sae={d}")
        weight[ids] = torch.tensor([float(w) for w in cfg.fpo_latent_weights.values()], dtype=c_pi.dtype,
                                   device=c_pi.device)
        member[:, ids] = True
    return (member * weight * (c_pi - c_ref) ** 2).sum(1) / member.sum(1)


@register
class FPO(Objective):
    """u = beta[(a_pi(y_w) - a_pi(y_l)) - (a_ref(y_w) - a_ref(y_l))] - alpha beta [D(y_l) - sg(D(y_w))],
    a = length-normalised log-prob, D the feature MSE of ``feature_mse``; loss = -log sigma(u) (SPEC section 5)."""

    name, reference, policy_needs, beta = "fpo", "features", frozenset({"features"}), 0.1
    settings = ("alpha", "fpo_k", "fpo_index_set", "fpo_latent_weights")

    def loss(self, policy, reference, cfg):
        (a_w, a_l), (r_w, r_l) = policy.stats.normalised(), reference.stats.normalised()
        pi_w, pi_l, ref_w, ref_l = (_given(x, self.name, "pooled SAE features of policy and reference") for x in (
            policy.chosen_features, policy.rejected_features, reference.chosen_features, reference.rejected_features))
        d_w, d_l = feature_mse(pi_w, ref_w, cfg), feature_mse(pi_l, ref_l, cfg)
        beta = self.beta_of(cfg)
        u = beta * ((a_w - a_l) - (r_w - r_l)) - cfg.alpha * beta * (d_l - d_w.detach())
        return -F.logsigmoid(u), u.detach()
