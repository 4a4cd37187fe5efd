"""Latent selection, directions and projections on hand-built examples with known answers."""
import pytest
import torch

from sparserm.reward.directions import (directions, frequency_scores, project, random_directions,
                                        select_activations, select_latents)

# grad = mu_w - mu_l = [0.75, -0.5, 0, 0.25, 0.25, -0.5] (binary fractions, so ties are exact)
MU_W = [0.875, 0.125, 0.5, 0.75, 0.5, 0.0]
MU_L = [0.125, 0.625, 0.5, 0.5, 0.25, 0.5]


def test_frequency_scores():
    grad, delta = frequency_scores(MU_W, MU_L)
    assert grad.tolist() == [0.75, -0.5, 0.0, 0.25, 0.25, -0.5]
    assert delta.tolist() == [-g for g in grad.tolist()]


def test_select_latents_known_answer_with_ties():
    pos, neg = select_latents(MU_W, MU_L, 2)
    assert pos.tolist() == [0, 3]  # 3 and 4 tie at 0.25: the lower id wins
    assert neg.tolist() == [1, 5]  # 1 and 5 tie at delta 0.5, ordered by id
    pos, neg = select_latents(torch.tensor(MU_W), torch.tensor(MU_L), 3)
    assert pos.tolist() == [0, 3, 4]
    assert neg.tolist() == [1, 5, 2]  # latent 2 (delta 0) fills the third slot
    assert pos.dtype == neg.dtype == torch.long


def test_select_latents_disjoint_when_scores_tie():
    zeros = [0.0] * 4  # every grad is 0: independent top-k would pick [0, 1] twice
    pos, neg = select_latents(zeros, zeros, 2)
    assert pos.tolist() == [0, 1] and neg.tolist() == [2, 3]
    with pytest.raises(ValueError, match="2k <= m"):
        select_latents(zeros, zeros, 3)
    with pytest.raises(ValueError):
        select_latents([0.1, 0.2], [0.1], 1)


def test_directions_and_projection_values():
    w_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # m=3 latents, d=2
    dirs = directions(w_dec, torch.tensor([2]), [0])
    assert dirs.tolist() == [[1.0, 1.0], [1.0, 0.0]]
    h = torch.tensor([[2.0, 3.0], [-1.0, 4.0]])
    v = project(h, dirs)
    assert v.shape == (2, 2) and v.dtype == torch.float32
    assert v.tolist() == [[5.0, 2.0], [3.0, -1.0]]
    with pytest.raises(ValueError):
        project(h, torch.ones(2, 3))


def test_projection_shapes_random():
    h, w_dec = torch.randn(7, 16), torch.randn(40, 16)
    pos, neg = select_latents(torch.rand(40), torch.rand(40), 5)
    v = project(h, directions(w_dec, pos, neg))
    assert v.shape == (7, 10)
    assert torch.allclose(v[:, 0], h @ w_dec[pos[0]], atol=1e-5)
    assert torch.allclose(v[:, 5], h @ w_dec[neg[0]], atol=1e-5)


def test_random_directions_and_activation_columns():
    r = random_directions(16, 10, seed=3)
    assert r.shape == (10, 16)
    assert torch.allclose(r.norm(dim=1), torch.ones(10), atol=1e-5)
    assert torch.equal(r, random_directions(16, 10, seed=3))
    assert not torch.equal(r, random_directions(16, 10, seed=4))
    f = torch.arange(12.0).reshape(2, 6)
    assert select_activations(f, [4, 1], [0]).tolist() == [[4.0, 1.0, 0.0], [10.0, 7.0, 6.0]]
