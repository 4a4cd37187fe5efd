"""Preference objectives by name (``align.loss.name``): what each needs from the reference model, and its loss.

An objective is an :class:`Objective` registered in ``OBJECTIVES`` (``@register``). It declares ``reference``,
what the trainer computes with the reference model, once per round, for every pair:

- ``"none"``: nothing; the trainer runs no reference pass and stores no reference (SimPO);
- ``"sequence"``: the summed response log-probs and response token counts of chosen and rejected, a
  :class:`PairStats` (length-normalised log-prob = sum / count) (DPO);
- later, not implemented: ``"token"`` (per-token log-probs, TDPO) and ``"features"`` (pooled SAE
  activations, FPO). ``register`` refuses them until the trainer can compute them.

``loss(policy, reference, cfg)`` gets the policy's :class:`PairStats` of a micro-batch (with gradients), the
reference's for the same pairs (None for ``"none"``) and ``align.loss``; it returns the per-pair loss [B] and u
[B], the detached margin whose sign is the pair's reward accuracy (logged; ``reward_margin`` = mean u / beta).

Settings: ``align.loss.beta`` unset (None) means the objective's own ``beta`` (DPO 0.1, SimPO 2.0, each
paper's default). Fields it reads beyond beta are named in ``settings``; ``key`` (the run's fingerprint of
the loss) holds the name, the beta in use and those fields only, so a SimPO setting never changes a DPO key.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F

REFERENCE_KINDS = ("none", "sequence")  # what the trainer can compute; "token" and "features" come later


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
    """One preference objective. Subclasses set ``name``, ``reference``, ``beta`` (default when
    ``align.loss.beta`` is unset) and ``settings``, and implement ``loss``."""

    name: str = ""
    reference: str = "sequence"  # an entry of REFERENCE_KINDS
    beta: float = 0.1
    settings: tuple[str, ...] = ()  # further align.loss fields the loss reads (they enter ``key``)

    def beta_of(self, cfg) -> float:
        return self.beta if cfg.beta is None else float(cfg.beta)

    def key(self, cfg) -> dict:
        """What of ``align.loss`` changes this objective's result."""
        return {"name": self.name, "beta": self.beta_of(cfg), **{k: getattr(cfg, k) for k in self.settings}}

    def loss(self, policy: PairStats, reference: PairStats | None, cfg) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


OBJECTIVES: dict[str, Objective] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: ``OBJECTIVES[cls.name] = cls()``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}: an objective needs a name")
    if cls.reference not in REFERENCE_KINDS:
        raise ValueError(f"objective {cls.name!r}: reference={cls.reference!r} is not computed by the trainer "
                         f"(expected one of {list(REFERENCE_KINDS)})")
    OBJECTIVES[cls.name] = cls()
    return cls


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"align.loss.name={name!r} is unknown: expected one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


@register
class DPO(Objective):
    """u = beta[(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))] (summed log-probs);
    loss = -log sigma(u) (Rafailov et al. 2023)."""

    name, reference, beta = "dpo", "sequence", 0.1

    def loss(self, policy, reference, cfg):
        u = self.beta_of(cfg) * ((policy.chosen - reference.chosen) - (policy.rejected - reference.rejected))
        return -F.logsigmoid(u), u.detach()


@register
class SimPO(Objective):
    """u = beta (a_pi(y_w) - a_pi(y_l)) - gamma, a = length-normalised log-prob; loss = -log sigma(u); no
    reference model (Meng et al. 2024; beta 2.0 and gamma 0.5 = ``align.loss.simpo_gamma`` by default)."""

    name, reference, beta, settings = "simpo", "none", 2.0, ("simpo_gamma",)

    def loss(self, policy, reference, cfg):
        a_w, a_l = policy.normalised()
        u = self.beta_of(cfg) * (a_w - a_l) - cfg.simpo_gamma
        return -F.logsigmoid(u), u.detach()

