"""Preference objectives (sparserm.align.objectives) on hand-computed values; the registry and the keys."""
import math

import pytest
import torch

from sparserm.align.objectives import OBJECTIVES, Objective, PairStats, get_objective, register
from sparserm.config import LossConfig


def softplus(x: float) -> float:  # -log sigmoid(u) = log(1 + e^-u) = softplus(-u)
    return math.log1p(math.exp(x))


def stats(chosen, rejected, chosen_tokens=(1.0, 1.0), rejected_tokens=(1.0, 1.0)) -> PairStats:
    return PairStats(*(torch.tensor(v, dtype=torch.float32) for v in (chosen, rejected, chosen_tokens,
                                                                       rejected_tokens)))


def test_dpo_matches_hand_computation():
    dpo = get_objective("dpo")
    assert dpo.reference == "sequence" and dpo.beta_of(LossConfig()) == 0.1
    policy, reference = stats([-10.0, -4.0], [-12.0, -3.0]), stats([-11.0, -4.0], [-11.0, -4.0])
    loss, u = dpo.loss(policy, reference, LossConfig())
    # pair 0: u = 0.1 * ((-10 + 11) - (-12 + 11)) = 0.2; pair 1: u = 0.1 * (0 - 1) = -0.1 (counts play no part)
    assert u.tolist() == pytest.approx([0.2, -0.1], abs=1e-6)
    assert loss.tolist() == pytest.approx([softplus(-0.2), softplus(0.1)], abs=1e-6)
    loss2, u2 = dpo.loss(policy, reference, LossConfig(beta=0.2))  # a set beta wins over the default
    assert u2.tolist() == pytest.approx([0.4, -0.2], abs=1e-6)


def test_simpo_matches_hand_computation():
    simpo = get_objective("simpo")
    assert simpo.reference == "none"  # no reference model at all
    cfg = LossConfig(name="simpo")  # beta unset: SimPO's 2.0; simpo_gamma 0.5
    assert simpo.beta_of(cfg) == 2.0 and cfg.simpo_gamma == 0.5
    policy = stats([-6.0, -8.0], [-12.0, -9.0], chosen_tokens=[3.0, 2.0], rejected_tokens=[4.0, 3.0])
    loss, u = simpo.loss(policy, None, cfg)
    # pair 0: a_w = -6/3 = -2, a_l = -12/4 = -3; u = 2 * (-2 + 3) - 0.5 = 1.5; loss = log(1 + e^-1.5) = 0.2014133
    # pair 1: a_w = -8/2 = -4, a_l = -9/3 = -3; u = 2 * (-4 + 3) - 0.5 = -2.5; loss = log(1 + e^2.5) = 2.5788897
    # (by summed log-probs pair 1's chosen would be the likelier one, -8 > -9: length normalisation flips it)
    assert u.tolist() == pytest.approx([1.5, -2.5], abs=1e-6)
    assert loss.tolist() == pytest.approx([0.2014133, 2.5788897], abs=1e-6)
    loss_g, u_g = simpo.loss(policy, None, LossConfig(name="simpo", beta=1.0, simpo_gamma=1.0))
    assert u_g.tolist() == pytest.approx([1.0 * 1 - 1.0, 1.0 * -1 - 1.0], abs=1e-6)  # u = (a_w - a_l) - 1
    assert loss_g.tolist() == pytest.approx([math.log(2.0), softplus(2.0)], abs=1e-6)


def test_losses_carry_gradients_and_margins_do_not():
    w = torch.tensor([-6.0], requires_grad=True)
    policy = PairStats(w, torch.tensor([-9.0]), torch.tensor([3.0]), torch.tensor([3.0]))
    loss, u = get_objective("simpo").loss(policy, None, LossConfig(name="simpo"))
    loss.sum().backward()
    # d/dw softplus(-u) = -sigmoid(-u) * beta / n_w; u = 2 * (-2 + 3) - 0.5 = 1.5
    assert w.grad.item() == pytest.approx(-(1 / (1 + math.exp(1.5))) * 2.0 / 3.0, abs=1e-6)
    assert not u.requires_grad


def test_registry_names_the_key_and_refuses_what_the_trainer_cannot_compute():
    assert {"dpo", "simpo"} <= set(OBJECTIVES)
    with pytest.raises(ValueError, match=r"align\.loss\.name='nope' is unknown: expected one of .*'dpo'.*'simpo'"):
        get_objective("nope")
    for kind in ("token", "features"):  # room for TDPO and FPO, not implemented yet
        with pytest.raises(ValueError, match="not computed by the trainer"):
            register(type("Later", (Objective,), {"name": "later", "reference": kind}))
    assert "later" not in OBJECTIVES


def test_keys_hold_what_each_objective_reads():
    cfg = LossConfig(simpo_gamma=0.9)
    assert get_objective("dpo").key(cfg) == {"name": "dpo", "beta": 0.1}  # as to_dict(align.loss) was before
    assert get_objective("simpo").key(LossConfig(name="simpo")) == {"name": "simpo", "beta": 2.0,
                                                                    "simpo_gamma": 0.5}


def test_pair_stats_normalise_select_and_round_trip():
    s = stats([-6.0, -8.0], [-12.0, -9.0], chosen_tokens=[3.0, 2.0], rejected_tokens=[4.0, 3.0])
    a_w, a_l = s.normalised()
    assert a_w.tolist() == [-2.0, -4.0] and a_l.tolist() == [-3.0, -3.0]
    assert [t.tolist() for t in s.select([1]).as_tuple()] == [[-8.0], [-9.0], [2.0], [3.0]]
    back = PairStats.from_dict(s.as_dict())
    assert all(torch.equal(x, y) for x, y in zip(back.as_tuple(), s.as_tuple()))
