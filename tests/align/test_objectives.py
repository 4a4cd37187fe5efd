"""Preference objectives (sparserm.align.objectives) on hand-computed values; the registry and the keys."""
import json
import math

import pytest
import torch

from sparserm.align.objectives import (OBJECTIVES, POLICY_NEEDS, REFERENCE_KINDS, Objective, PairStats,
                                       get_objective, register)
from sparserm.align.pair_forward import NEEDS, PairForward, TokenDists
from sparserm.config import LossConfig


def softplus(x: float) -> float:  # -log sigmoid(u) = log(1 + e^-u) = softplus(-u)
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def stats(chosen, rejected, chosen_tokens=(1.0, 1.0), rejected_tokens=(1.0, 1.0), grad=False) -> PairStats:
    return PairStats(*(torch.tensor(v, dtype=torch.float32, requires_grad=grad and i < 2)
                       for i, v in enumerate((chosen, rejected, chosen_tokens, rejected_tokens))))


def fwd(s: PairStats, **kw) -> PairForward:
    return PairForward(s, **kw)


def test_dpo_matches_hand_computation():
    dpo = get_objective("dpo")
    assert dpo.reference == "sequence" and dpo.beta_of(LossConfig()) == 0.1
    policy, reference = stats([-10.0, -4.0], [-12.0, -3.0]), stats([-11.0, -4.0], [-11.0, -4.0])
    policy, reference = fwd(policy), fwd(reference)
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
    policy = fwd(stats([-6.0, -8.0], [-12.0, -9.0], chosen_tokens=[3.0, 2.0], rejected_tokens=[4.0, 3.0]))
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
    loss, u = get_objective("simpo").loss(fwd(policy), None, LossConfig(name="simpo"))
    loss.sum().backward()
    # d/dw softplus(-u) = -sigmoid(-u) * beta / n_w; u = 2 * (-2 + 3) - 0.5 = 1.5
    assert w.grad.item() == pytest.approx(-(1 / (1 + math.exp(1.5))) * 2.0 / 3.0, abs=1e-6)
    assert not u.requires_grad


def test_registry_names_the_key_and_refuses_what_the_trainer_cannot_compute():
    assert REFERENCE_KINDS == ("none", "sequence", "token", "features") and POLICY_NEEDS == NEEDS
    declared = {n: (o.reference, o.policy_needs) for n, o in OBJECTIVES.items()}
    assert {k: declared[k] for k in ("dpo", "simpo", "tdpo2", "fpo")} == {
        "dpo": ("sequence", frozenset()), "simpo": ("none", frozenset()),
        "tdpo2": ("token", frozenset({"token"})), "fpo": ("features", frozenset({"features"}))}
    assert [get_objective(n).beta_of(LossConfig()) for n in ("dpo", "simpo", "tdpo2", "fpo")] == [0.1, 2.0, 0.1, 0.1]
    with pytest.raises(ValueError, match=r"align\.loss\.name='nope' is unknown: expected one of .*'dpo'.*'simpo'"):
        get_objective("nope")
    with pytest.raises(ValueError, match="not computed by the trainer"):
        register(type("Later", (Objective,), {"name": "later", "reference": "logits"}))
    with pytest.raises(ValueError, match="not computed by the policy forward"):
        register(type("Later", (Objective,), {"name": "later", "policy_needs": frozenset({"hidden"})}))
    assert "later" not in OBJECTIVES


def test_keys_hold_what_each_objective_reads():
    cfg = LossConfig(simpo_gamma=0.9, alpha=0.2, fpo_k=7, fpo_index_set="policy", fpo_latent_weights={3: 2.0})
    assert get_objective("dpo").key(cfg) == {"name": "dpo", "beta": 0.1}  # as to_dict(align.loss) was before
    assert get_objective("simpo").key(LossConfig(name="simpo")) == {"name": "simpo", "beta": 2.0,
                                                                    "simpo_gamma": 0.5}
    assert get_objective("tdpo2").key(cfg) == {"name": "tdpo2", "beta": 0.1, "alpha": 0.2}
    assert get_objective("fpo").key(LossConfig()) == {"name": "fpo", "beta": 0.1, "alpha": 0.5, "fpo_k": 50,
                                                      "fpo_index_set": "union", "fpo_latent_weights": []}
    key = get_objective("fpo").key(replace_loss(cfg, fpo_latent_weights={7: 0.5, 3: 2.0}))
    assert key == {"name": "fpo", "beta": 0.1, "alpha": 0.2, "fpo_k": 7, "fpo_index_set": "policy",
                   "fpo_latent_weights": [[3, 2.0], [7, 0.5]]}  # sorted by id, whatever the dict's order
    assert json.loads(json.dumps(key)) == key  # JSON-stable: survives a round trip unchanged
    assert key == get_objective("fpo").key(replace_loss(cfg, fpo_latent_weights={3: 2.0, 7: 0.5}))


def replace_loss(cfg: LossConfig, **kw) -> LossConfig:
    from dataclasses import replace

    return replace(cfg, **kw)


# ---- TDPO-2 -------------------------------------------------------------------------------------------------

P, Q, R, U = [0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]  # V = 3
# rows: chosen pair 0, chosen pair 1, rejected pair 0, rejected pair 1; T = 2 positions each
PI_ROWS = [[P, Q], [R, U], [Q, R], [U, P]]
REF_ROWS = [[Q, Q], [P, R], [P, P], [R, U]]
MASK = [[1, 1], [1, 0], [0, 1], [1, 1]]


def kl(ref: list[float], pi: list[float]) -> float:  # KL(ref || pi) = sum_v ref(v) (log ref(v) - log pi(v))
    return sum(r * (math.log(r) - math.log(p)) for r, p in zip(ref, pi))


def seq_kl(row: int) -> float:
    return sum(kl(REF_ROWS[row][t], PI_ROWS[row][t]) for t in range(2) if MASK[row][t])


def logp(rows, grad=False) -> torch.Tensor:
    return torch.tensor([[[math.log(x) for x in dist] for dist in row] for row in rows], requires_grad=grad)


def tdpo_inputs(grad=False):
    mask = torch.tensor(MASK, dtype=torch.float32)
    pi_logp = logp(PI_ROWS, grad)
    policy = fwd(stats([-3.0, -5.0], [-4.0, -4.0], grad=grad), tokens=TokenDists(pi_logp, mask))
    reference = fwd(stats([-3.5, -4.5], [-3.5, -4.5]), tokens=TokenDists(logp(REF_ROWS), mask))
    return policy, reference, pi_logp


def test_tdpo2_matches_hand_computation():
    tdpo = get_objective("tdpo2")
    policy, reference, _ = tdpo_inputs()
    # sequential KLs: the masked positions (row 1 position 1, row 2 position 0) do not count
    assert seq_kl(0) == pytest.approx(0.25 * math.log(2))  # KL(Q || P) + KL(Q || Q) = (-0.25 + 0.5) ln 2
    kl_w, kl_l = [seq_kl(0), seq_kl(1)], [seq_kl(2), seq_kl(3)]
    assert kl_w[1] == pytest.approx(kl(P, R)) and kl_l[0] == pytest.approx(kl(P, R))
    # margins of summed log-probs: pair 0 (-3 + 3.5) - (-4 + 3.5) = 1; pair 1 (-5 + 4.5) - (-4 + 4.5) = -1
    margin = [1.0, -1.0]
    loss, u = tdpo.loss(policy, reference, LossConfig(name="tdpo2"))  # beta 0.1, alpha 0.5
    want = [0.1 * margin[i] - 0.5 * 0.1 * (kl_l[i] - kl_w[i]) for i in range(2)]
    assert u.tolist() == pytest.approx(want, abs=1e-6)
    assert loss.tolist() == pytest.approx([softplus(-x) for x in want], abs=1e-6)
    _, u2 = tdpo.loss(policy, reference, LossConfig(name="tdpo2", beta=0.2, alpha=1.0))
    assert u2.tolist() == pytest.approx([0.2 * margin[i] - 0.2 * (kl_l[i] - kl_w[i]) for i in range(2)], abs=1e-6)
    _, u0 = tdpo.loss(policy, reference, LossConfig(name="tdpo2", alpha=0.0))  # no KL term: DPO's margin
    assert u0.tolist() == pytest.approx([0.1, -0.1], abs=1e-6)


def test_tdpo2_kl_of_the_chosen_is_stop_gradient():
    policy, reference, pi_logp = tdpo_inputs(grad=True)
    loss, u = get_objective("tdpo2").loss(policy, reference, LossConfig(name="tdpo2"))
    loss.sum().backward()
    g = pi_logp.grad
    assert torch.all(g[:2] == 0)  # the chosen half: sg(KL(y_w))
    # rejected: d loss / d log pi(v) = -sigma(-u) * (-alpha beta) * d KL / d log pi(v) = -sigma(-u) alpha beta p_ref(v)
    for row, pair in ((2, 0), (3, 1)):
        for t in range(2):
            want = [-sigmoid(-u[pair].item()) * 0.05 * r * MASK[row][t] for r in REF_ROWS[row][t]]
            assert g[row, t].tolist() == pytest.approx(want, abs=1e-6)
    assert torch.any(g[2:] != 0)
    s = sigmoid(-u[0].item()), sigmoid(-u[1].item())
    assert policy.stats.chosen.grad.tolist() == pytest.approx([-s[0] * 0.1, -s[1] * 0.1], abs=1e-6)
    assert policy.stats.rejected.grad.tolist() == pytest.approx([s[0] * 0.1, s[1] * 0.1], abs=1e-6)
    assert not u.requires_grad


# ---- FPO ----------------------------------------------------------------------------------------------------

# d_sae = 5; with k = 2: chosen   topk(pi) = {0, 4}, topk(ref) = {1, 0}, union {0, 1, 4}
#                        rejected topk(pi) = {2, 1}, topk(ref) = {3, 2}, union {1, 2, 3}
C_PI_W, C_REF_W = [3.0, 0.0, 1.0, 0.0, 2.0], [2.0, 4.0, 0.0, 0.0, 1.0]
C_PI_L, C_REF_L = [0.0, 1.0, 5.0, 0.0, 0.0], [1.0, 0.0, 2.0, 3.0, 0.0]


def fpo_inputs(grad=False):
    """Pair 0 as above; pair 1 the same stats with chosen and rejected features swapped. a_pi = (-6/3, -12/4) =
    (-2, -3), a_ref = (-7.5/3, -10/4) = (-2.5, -2.5): the margin is (-2 + 3) - (-2.5 + 2.5) = 1 for both."""
    cw = torch.tensor([C_PI_W, C_PI_L], requires_grad=grad)
    cl = torch.tensor([C_PI_L, C_PI_W], requires_grad=grad)
    policy = fwd(stats([-6.0, -6.0], [-12.0, -12.0], [3.0, 3.0], [4.0, 4.0], grad=grad),
                 chosen_features=cw, rejected_features=cl)
    reference = fwd(stats([-7.5, -7.5], [-10.0, -10.0], [3.0, 3.0], [4.0, 4.0]),
                    chosen_features=torch.tensor([C_REF_W, C_REF_L]),
                    rejected_features=torch.tensor([C_REF_L, C_REF_W]))
    return policy, reference


def fpo_u(d_w: float, d_l: float, beta=0.1, alpha=0.5) -> float:
    return beta * 1.0 - alpha * beta * (d_l - d_w)


@pytest.mark.parametrize("index_set, d_w, d_l", [
    # policy: chosen I = {0, 4}: ((3-2)^2 + (2-1)^2) / 2 = 1; rejected I = {2, 1}: ((5-2)^2 + (1-0)^2) / 2 = 5
    ("policy", 1.0, 5.0),
    # union: chosen I = {0, 1, 4}: (1 + 16 + 1) / 3 = 6; rejected I = {1, 2, 3}: (1 + 9 + 9) / 3 = 19/3
    ("union", 6.0, 19 / 3),
])
def test_fpo_matches_hand_computation(index_set, d_w, d_l):
    fpo = get_objective("fpo")
    policy, reference = fpo_inputs()
    loss, u = fpo.loss(policy, reference, LossConfig(name="fpo", fpo_k=2, fpo_index_set=index_set))
    want = [fpo_u(d_w, d_l), fpo_u(d_l, d_w)]  # pair 1: the features swapped
    assert u.tolist() == pytest.approx(want, abs=1e-6)
    assert loss.tolist() == pytest.approx([softplus(-x) for x in want], abs=1e-6)


def test_fpo_index_sets_differ_and_k_is_capped_at_d_sae():
    policy, reference = fpo_inputs()
    _, u_pol = get_objective("fpo").loss(policy, reference, LossConfig(fpo_k=2, fpo_index_set="policy"))
    _, u_uni = get_objective("fpo").loss(policy, reference, LossConfig(fpo_k=2))  # union is the default
    assert u_pol[0].item() == pytest.approx(0.1 - 0.05 * 4, abs=1e-6)  # -0.1: the pair counts as wrong ...
    assert u_uni[0].item() == pytest.approx(0.1 - 0.05 / 3, abs=1e-6)  # ... +0.0833 under the paper's union
    # k = 50 > d_sae = 5: every latent is in I; chosen (1 + 16 + 1 + 0 + 1) / 5 = 3.8, rejected (1+1+9+9+0) / 5 = 4
    for index_set in ("union", "policy"):
        _, u = get_objective("fpo").loss(policy, reference, LossConfig(fpo_index_set=index_set))
        assert u.tolist() == pytest.approx([fpo_u(3.8, 4.0), fpo_u(4.0, 3.8)], abs=1e-6)
    _, u = get_objective("fpo").loss(policy, reference, LossConfig(fpo_k=1, alpha=1.0, beta=0.5))
    # k = 1: chosen I = {0} | {1}: (1 + 16) / 2 = 8.5; rejected I = {2} | {3}: (9 + 9) / 2 = 9
    assert u.tolist() == pytest.approx([fpo_u(8.5, 9.0, 0.5, 1.0), fpo_u(9.0, 8.5, 0.5, 1.0)], abs=1e-6)


def test_fpo_latent_weights_always_enter_with_their_weight():
    policy, reference = fpo_inputs()
    cfg = LossConfig(fpo_k=2, fpo_index_set="policy", fpo_latent_weights={3: 2.0, 0: 0.5})
    _, u = get_objective("fpo").loss(policy, reference, cfg)
    # chosen I = {0, 4} + {3}: (0.5 (3-2)^2 + 2 (0-0)^2 + 1 (2-1)^2) / 3 = 0.5
    # rejected I = {2, 1} + {3, 0}: (0.5 (0-1)^2 + 1 (1-0)^2 + 1 (5-2)^2 + 2 (0-3)^2) / 4 = 28.5 / 4 = 7.125
    assert u.tolist() == pytest.approx([fpo_u(0.5, 7.125), fpo_u(7.125, 0.5)], abs=1e-6)
    _, u0 = get_objective("fpo").loss(policy, reference, replace_loss(cfg, fpo_latent_weights={2: 0.0}))
    # weight 0 on latent 2: still a member (|I| counts it), contributes nothing. chosen I = {0, 4, 2}:
    # (1 + 1 + 0) / 3 = 2/3; rejected I = {2, 1}: (0 + 1) / 2 = 0.5
    assert u0.tolist() == pytest.approx([fpo_u(2 / 3, 0.5), fpo_u(0.5, 2 / 3)], abs=1e-6)


def test_fpo_refuses_a_latent_id_beyond_d_sae():
    policy, reference = fpo_inputs()
    with pytest.raises(ValueError, match=r"align\.loss\.fpo_latent_weights.*\b5\b"):
        get_objective("fpo").loss(policy, reference, LossConfig(fpo_latent_weights={1: 1.0, 5: 1.0}))


def test_fpo_mse_of_the_chosen_is_stop_gradient():
    policy, reference = fpo_inputs(grad=True)
    loss, u = get_objective("fpo").loss(policy, reference, LossConfig(fpo_k=2))
    loss.sum().backward()
    cw, cl = policy.chosen_features, policy.rejected_features
    assert cw.grad is None or torch.all(cw.grad == 0)
    # pair 0, rejected I = {1, 2, 3}: d loss / d c_i = -sigma(-u) (-alpha beta) 2 (c_pi,i - c_ref,i) / 3
    s0 = sigmoid(-u[0].item())
    want = [0.0] + [s0 * 0.05 * 2 * (C_PI_L[i] - C_REF_L[i]) / 3 for i in (1, 2, 3)] + [0.0]
    assert cl.grad[0].tolist() == pytest.approx(want, abs=1e-6)
    assert torch.any(cl.grad[1] != 0)
    # the margin reaches the policy stats through a = sum / count
    s = sigmoid(-u[0].item()), sigmoid(-u[1].item())
    assert policy.stats.chosen.grad.tolist() == pytest.approx([-s[0] * 0.1 / 3, -s[1] * 0.1 / 3], abs=1e-6)
    assert policy.stats.rejected.grad.tolist() == pytest.approx([s[0] * 0.1 / 4, s[1] * 0.1 / 4], abs=1e-6)
    assert not u.requires_grad


def test_pair_stats_normalise_select_and_round_trip():
    s = stats([-6.0, -8.0], [-12.0, -9.0], chosen_tokens=[3.0, 2.0], rejected_tokens=[4.0, 3.0])
    a_w, a_l = s.normalised()
    assert a_w.tolist() == [-2.0, -4.0] and a_l.tolist() == [-3.0, -3.0]
    assert [t.tolist() for t in s.select([1]).as_tuple()] == [[-8.0], [-9.0], [2.0], [3.0]]
    back = PairStats.from_dict(s.as_dict())
    assert all(torch.equal(x, y) for x, y in zip(back.as_tuple(), s.as_tuple()))
