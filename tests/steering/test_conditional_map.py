"""The map's math, the sparsifiers, the steering vector and the latent edit against hand-computed values."""
import pytest
import torch
from torch.testing import assert_close

from sparserm.config import SteerConfig
from sparserm.steering.conditional_map import (ConditionalMap, activation_density, conditional_difference_map,
                                               sparsifier_key, sparsify)
from sparserm.steering.edit import edit_latents
from sparserm.steering.vector import SteerSettings, steering_vector

# two triples; SAE activations per token (rows) and latent (columns): m_in = 3, m_out = 2
PROMPTS = [torch.tensor([[1.0, 0, 2], [0, 0, 3]]), torch.tensor([[0.0, 1, 0]])]  # g = [.5, 0, 1], [0, 1, 0]
CHOSEN = [torch.tensor([[1.0, 0], [1, 0], [0, 0], [2, 1]]), torch.tensor([[0.0, 1]])]  # rho = [.75, .25], [0, 1]
REJECTED = [torch.tensor([[0.0, 1], [0, 0]]), torch.tensor([[1.0, 1]])]  # rho = [0, .5], [1, 1]
# A = 1/2 (g1 drho1^T + g2 drho2^T), drho1 = [.75, -.25], drho2 = [-1, 0]
A_HAND = torch.tensor([[0.1875, -0.0625], [-0.5, 0.0], [0.375, -0.125]])


def hand_map() -> torch.Tensor:
    g = torch.stack([activation_density(p) for p in PROMPTS])
    drho = torch.stack([activation_density(c) - activation_density(r) for c, r in zip(CHOSEN, REJECTED)])
    return conditional_difference_map(g, drho)


def test_map_equals_the_hand_computed_value():
    assert_close(hand_map(), A_HAND, rtol=0, atol=1e-7)


def test_density_counts_only_the_texts_own_tokens_never_padding():
    padded = torch.zeros(2, 4, 2)
    padded[0] = CHOSEN[0]
    padded[1, :2] = REJECTED[0]
    padded[1, 2:] = 5.0  # padding positions full of "active" values
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert_close(activation_density(padded, mask), torch.tensor([[0.75, 0.25], [0.0, 0.5]]))
    with pytest.raises(ValueError, match="no tokens"):
        activation_density(torch.ones(1, 2, 2), torch.zeros(1, 2))


@pytest.mark.parametrize("settings, kept", [
    ({"sparsifier": "top_per_row", "top_per_row": 1}, [(0, 0), (1, 0), (2, 0)]),
    ({"sparsifier": "top_per_row", "top_per_row": 2}, [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1)]),  # zeros never kept
    ({"sparsifier": "threshold", "threshold": 0.1}, [(0, 0), (1, 0), (2, 0), (2, 1)]),
    ({"sparsifier": "threshold", "threshold": 0.0}, [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1)]),
])
def test_sparsifiers_keep_exactly_what_they_should(settings, kept):
    cmap = sparsify(A_HAND, SteerConfig(**settings))
    expected = torch.zeros_like(A_HAND)
    for i, j in kept:
        expected[i, j] = A_HAND[i, j]
    assert_close(cmap.dense(), expected, rtol=0, atol=0)
    assert cmap.nnz == len(kept) and (cmap.m_in, cmap.m_out) == (3, 2)


def test_top_per_row_breaks_ties_to_the_lower_latent_and_keys_only_what_it_reads():
    cmap = sparsify(torch.tensor([[0.5, -0.5, 0.5]]), SteerConfig(top_per_row=1))
    assert cmap.indices.tolist() == [0]
    assert sparsifier_key(SteerConfig(top_per_row=3, threshold=9.0)) == {"name": "top_per_row", "top_per_row": 3}
    assert sparsifier_key(SteerConfig(sparsifier="threshold", threshold=0.5)) == {"name": "threshold",
                                                                                   "threshold": 0.5}


def test_csr_round_trip_and_gated_scores():
    cmap = ConditionalMap.from_dense(A_HAND)
    again = ConditionalMap.from_tensors(cmap.tensors())
    assert_close(again.dense(), A_HAND, rtol=0, atol=0)
    # s = A^T g_gated with g_gated = 2 at latent 0 and 1 at latent 2: 2 A[0] + A[2]
    assert_close(cmap.scores(torch.tensor([2, 0]), torch.tensor([1.0, 2.0])), torch.tensor([0.75, -0.25]))


def test_steering_vector_gates_the_prompt_then_ranks_output_latents_by_magnitude():
    cmap = ConditionalMap.from_dense(A_HAND)
    g = torch.tensor([0.5, 0.0, 1.0])
    settings = SteerSettings(alpha=0.3, mode="add", k_prompt=1, k_diff=2)
    v = steering_vector(g, cmap, settings)  # gate keeps latent 2 (g = 1): s = A[2] = [.375, -.125]
    assert v.gate.tolist() == [2] and v.latents.tolist() == [0, 1]
    assert_close(v.scores, torch.tensor([0.375, -0.125]))
    v = steering_vector(g, cmap, SteerSettings(alpha=0.3, mode="add", k_prompt=2, k_diff=1))  # s = .5 A[0] + A[2]
    assert v.gate.tolist() == [2, 0] and v.latents.tolist() == [0]
    assert_close(v.scores, torch.tensor([0.46875]))
    assert (v.alpha, v.mode) == (0.3, "add")


def test_edit_moves_only_active_selected_latents_by_mode_per_row():
    a = torch.tensor([[1.0, 0.0, 3.0, 0.5], [1.0, 0.0, 3.0, 0.5]])
    latents = torch.tensor([[1, 3, -1], [1, 3, 0]])  # latent 1 is selected but inactive; -1: an unused slot
    scores = torch.tensor([[0.2, -0.4, 0.0], [0.2, -0.4, 0.7]])
    out = edit_latents(a, latents, scores, torch.tensor([0.5, 0.5]), ["add", "ablate"])
    # add: latent 3 (active, s < 0) moves by 0.5 x max(a) = 1.5 downwards; ablate: latent 3 (s < 0) is zeroed and
    # latent 0 (s > 0) is kept
    assert_close(out, torch.tensor([[1.0, 0.0, 3.0, -1.0], [1.0, 0.0, 3.0, 0.0]]), rtol=0, atol=0)
    same = edit_latents(a, latents, scores, torch.tensor([0.0, 0.0]), ["add", "add"])
    assert torch.equal(same, a)  # alpha 0: nothing moves, bit for bit
    with pytest.raises(ValueError, match="unknown"):
        edit_latents(a, latents, scores, torch.tensor([0.5, 0.5]), ["add", "boost"])
